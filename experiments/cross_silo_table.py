"""The cross-silo benchmark's run names, its published reference figures and
its table (used by :mod:`experiments.cross_silo`; no flags, so tests import it)."""

from __future__ import annotations

import os
import statistics

from isr_jax.fl.registry import ALGORITHMS
from isr_jax.metric_writer import read_metrics

SKEW_TAGS = {"dirichlet": "dir05", "classes2": "c2"}
SKEW_TITLES = {"dirichlet": "Dir(0.5)", "classes2": "#C = 2"}

# NIID-Bench (Li, Diao, Chen, He, ICDE 2022), Table III, FMNIST with the simple
# CNN, 10 parties, 10 local epochs, 50 rounds: top-1 test accuracy (%), mean
# over 3 seeds. Quoted from the paper, which is not available offline here.
PUBLISHED = {
    ("dirichlet", "fedavg"): 86.1, ("dirichlet", "fedprox"): 86.6,
    ("dirichlet", "scaffold"): 86.8, ("dirichlet", "fednova"): 86.4,
    ("classes2", "fedavg"): 77.3, ("classes2", "fedprox"): 74.9,
    ("classes2", "scaffold"): 42.8, ("classes2", "fednova"): 78.9,
}


def parse_run(text: str) -> tuple[str, str, int]:
  """``"skew:algorithm:seed"`` -> its parts, or a one-line usage error."""
  parts = text.split(":")
  if (len(parts) != 3 or parts[0] not in SKEW_TAGS or parts[1] not in ALGORITHMS
      or not parts[2].isdigit()):
    raise ValueError(
        f"--runs entry {text!r} is not skew:algorithm:seed with skew in {sorted(SKEW_TAGS)}, "
        f"algorithm in {sorted(ALGORITHMS)} and a seed >= 0")
  return parts[0], parts[1], int(parts[2])


def run_dir(workdir: str, skew: str, algorithm: str, seed: int) -> str:
  return os.path.join(workdir, f"{SKEW_TAGS[skew]}_{algorithm}_s{seed}")


def summarize_run(path: str) -> dict:
  """Best / final accuracy, rounds and median s/round from a workdir's metrics."""
  nan = float("nan")
  history = read_metrics(path) if os.path.exists(os.path.join(path, "metrics.jsonl")) else []
  evals = [r for r in history if "test/accuracy" in r and "time/round_s" in r]
  if not evals:
    return {"rounds": 0, "best_accuracy": nan, "best_round": 0, "final_accuracy": nan,
            "round_s": nan}
  best = max(evals, key=lambda r: r["test/accuracy"])
  return {
      "rounds": evals[-1]["round"],
      "best_accuracy": best["test/accuracy"], "best_round": best["round"],
      "final_accuracy": evals[-1]["test/accuracy"],
      "round_s": statistics.median(r["time/round_s"] for r in evals),
  }


def format_markdown(rows: list[dict]) -> str:
  lines = ["| label skew | algorithm | seed | rounds | best acc. (round) | final acc. "
           "| NIID-Bench (50 rounds) | s / round |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    published = PUBLISHED.get((r["skew"], r["algorithm"]))
    ref = f"{published:.1f} %" if published else "—"
    if not r["rounds"]:
      lines.append(f"| {SKEW_TITLES[r['skew']]} | {r['algorithm']} | {r['seed']} | 0 | "
                   f"not run | | {ref} | |")
      continue
    lines.append(
        f"| {SKEW_TITLES[r['skew']]} | {r['algorithm']} | {r['seed']} | {r['rounds']} "
        f"| {100 * r['best_accuracy']:.2f} % ({r['best_round']}) "
        f"| {100 * r['final_accuracy']:.2f} % | {ref} | {r['round_s']:.1f} |")
  return "\n".join(lines) + "\n"
