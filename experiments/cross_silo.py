r"""The cross-silo Fashion-MNIST benchmark row (experiments/configs/cross_silo.py).

Runs each (label skew, algorithm, seed) of ``--runs`` for ``--rounds`` rounds,
each in its own workdir under ``--workdir`` (so a run that is stopped resumes
where it was), then writes ``<workdir>/cross_silo.md`` and ``cross_silo.csv``:
best and final test accuracy, the rounds run, the median seconds per round,
next to the accuracy NIID-Bench reports for the same setting.

  python -m experiments.cross_silo --workdir=runs/cross_silo --rounds=20
  python -m experiments.cross_silo --workdir=runs/cross_silo --report_only
  python -m experiments.cross_silo --workdir=/tmp/cs --local --rounds=2   # seconds

A run is ``skew:algorithm:seed`` with ``skew`` one of ``dirichlet`` (Dir(0.5))
and ``classes2`` (#C = 2).
"""

from __future__ import annotations

import logging as std_logging
import os
import statistics

from absl import app, flags, logging

from experiments.configs import cross_silo
from experiments.reporting import train_unless_diverged, write_csv
from isr_jax.fl.registry import ALGORITHMS
from isr_jax.metric_writer import read_metrics

DEFAULT_RUNS = ("dirichlet:fedavg:0", "dirichlet:fedprox:0", "dirichlet:scaffold:0",
                "dirichlet:fednova:0", "classes2:fedavg:0", "dirichlet:fedavg:1")

_WORKDIR = flags.DEFINE_string("workdir", "runs/cross_silo", "Parent of every run's workdir.")
_RUNS = flags.DEFINE_list("runs", list(DEFAULT_RUNS), "skew:algorithm:seed of each run.")
_ROUNDS = flags.DEFINE_integer("rounds", 50, "Rounds per run (the literature runs 50).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Fashion-MNIST IDX directory (default: the Debian package's).")
_LOCAL = flags.DEFINE_bool("local", False, "The preset's `local` variant: a run of seconds.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only tabulate the workdirs' metrics; train nothing.")

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
    raise app.UsageError(
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  runs = [parse_run(r) for r in _RUNS.value]
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for skew, algorithm, seed in runs:
    path = run_dir(workdir, skew, algorithm, seed)
    if not _REPORT_ONLY.value:
      config = cross_silo.get_config(skew + (",local" if _LOCAL.value else ""))
      config.dataset.data_dir = _DATA_DIR.value
      config.fl.algorithm = algorithm
      config.seed = seed
      config.num_rounds = _ROUNDS.value
      train_unless_diverged(config, path, os.path.basename(path))
    rows.append({"skew": skew, "algorithm": algorithm, "seed": seed,
                 **summarize_run(path)})
    print(format_markdown(rows[-1:]).splitlines()[-1], flush=True)
  markdown = format_markdown(rows)
  with open(os.path.join(workdir, "cross_silo.md"), "w") as f:
    f.write(markdown)
  write_csv(rows, os.path.join(workdir, "cross_silo.csv"))
  print("\n" + markdown)


if __name__ == "__main__":
  app.run(main)
