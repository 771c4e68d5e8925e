r"""Paired comparison: FL algorithms without and with ISR (OmniISR Table VII, §4.3).

Runs each algorithm × {−ISR, +ISR} × seed from one base config, then writes
``<workdir>/comparison.md`` and ``comparison.csv``: the final test metrics per
(algorithm, ISR) as mean ± std over seeds, the +ISR − (−ISR) difference, the
bytes each algorithm moves per round, and the paired-wins count over
(algorithm × metric) — the paper's "37/48".

  python -m experiments.compare --workdir=runs/compare                  # digits, < 15 min
  python -m experiments.compare --config=experiments/configs/compare.py:fashion_mnist \
      --workdir=runs/compare_fmnist --seeds=0,1,2
"""

from __future__ import annotations

import logging as std_logging
import os
import statistics
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common_flags import SEEDS, WORKDIR
from experiments.reporting import (
  divergence_note,
  fmt,
  mean_std,
  train_unless_diverged,
  write_csv,
)
from isr_jax.analysis import paired_wins
from isr_jax.fl.registry import ALGORITHMS

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/compare.py:digits", "Base config of every run.")
_ALGORITHMS = flags.DEFINE_list("algorithms", None, "Algorithms (default: the config's list).")

METRICS = ("accuracy", "mF1", "mPre", "mRec")  # higher is better, like the paper's four


def run_all(base, workdir: str, algorithms: list[str], seeds: list[int]):
  """``{(algorithm, isr): [final metrics per seed]}``."""
  results: dict[tuple[str, bool], list[dict[str, float]]] = {}
  for name in algorithms:
    for isr in (False, True):
      for seed in seeds:
        config = base.copy_and_resolve_references()
        config.fl.algorithm = name
        config.isr.enabled = isr
        config.seed = seed
        run = f"{name}_{'isr' if isr else 'base'}_seed{seed}"
        t0 = time.perf_counter()
        out = train_unless_diverged(config, os.path.join(workdir, run), f"{run:28s}")
        if out is None:
          results.setdefault((name, isr), []).append(None)
          continue
        # From the history, not the final metrics: a run resumed after it had
        # finished only re-evaluates, so its final metrics hold no training figures.
        m = dict(out["metrics"])
        rounds = [r for r in out["history"] if "time/round_s" in r]
        m["round_s"] = statistics.median(r["time/round_s"] for r in rounds)
        for key in ("comm/up_bytes", "comm/down_bytes"):
          m[key] = next(r[key] for r in reversed(out["history"]) if key in r)
        results.setdefault((name, isr), []).append(m)
        print(f"  {run:28s} acc {m['test/accuracy']:.4f}  ({time.perf_counter() - t0:.0f}s)",
              flush=True)
  return results


def summarize(results) -> list[dict]:
  """One row per (algorithm, ISR) with means, stds and communication.

  Means are over the runs that finished; ``diverged`` counts the others. With
  none finished every number is NaN (and the pair is no paired comparison).
  """
  rows = []
  nan = float("nan")
  for (name, isr), all_runs in results.items():
    runs = [r for r in all_runs if r is not None]
    row = {"algorithm": name, "isr": isr, "seeds": len(runs),
           "diverged": len(all_runs) - len(runs)}
    for metric in (*METRICS, "loss"):
      row[metric], row[f"{metric}_std"] = mean_std([r[f"test/{metric}"] for r in runs])
    row["up_MB_per_round"] = runs[0]["comm/up_bytes"] / 1e6 if runs else nan
    row["down_MB_per_round"] = runs[0]["comm/down_bytes"] / 1e6 if runs else nan
    row["round_s"] = mean_std([r["round_s"] for r in runs])[0]
    rows.append(row)
  return rows


def format_markdown(rows: list[dict], title: str) -> str:
  by_key = {(r["algorithm"], r["isr"]): r for r in rows}
  names = list(dict.fromkeys(r["algorithm"] for r in rows))
  lines = [f"## {title}", "",
           "| algorithm | ISR | accuracy | mF1 | mPre | mRec | MB up / round | MB down / round |",
           "|---|---|---|---|---|---|---|---|"]
  for name in names:
    for isr in (False, True):
      r = by_key[(name, isr)]
      cells = " | ".join(fmt(r[m], r[m + "_std"]) for m in METRICS) + divergence_note(r)
      lines.append(f"| {name} | {'✓' if isr else '✗'} | {cells} | {r['up_MB_per_round']:.3f} "
                   f"| {r['down_MB_per_round']:.3f} |")
  lines += ["", "| algorithm | Δ accuracy | Δ mF1 | Δ mPre | Δ mRec |", "|---|---|---|---|---|"]
  for name in names:
    on, off = by_key[(name, True)], by_key[(name, False)]
    lines.append(f"| {name} | " + " | ".join(f"{on[m] - off[m]:+.4f}" for m in METRICS) + " |")
  wins, total = paired_wins({k: v for k, v in by_key.items()}, METRICS)
  lines += ["", f"Paired wins of +ISR over −ISR across (algorithm × metric): **{wins}/{total}** "
            f"(means over the finished seeds; the OmniISR paper reports 37/48)."]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  base = _CONFIG.value
  algorithms = _ALGORITHMS.value or list(base.compare.algorithms)
  unknown = [a for a in algorithms if a not in ALGORITHMS]
  if unknown:
    raise app.UsageError(f"--algorithms: {unknown} not among {sorted(ALGORITHMS)}")
  seeds = [int(s) for s in (SEEDS.value or base.compare.seeds)]
  workdir = WORKDIR.value or "runs/compare"
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  print(f"comparing {len(algorithms)} algorithms × ±ISR × {len(seeds)} seed(s) on "
        f"{base.dataset.name}, {base.num_rounds} rounds each")
  rows = summarize(run_all(base, workdir, algorithms, seeds))
  title = (f"{base.dataset.name}, {base.model.name}, {base.fl.num_clients} clients "
           f"({base.fl.partition.method} {base.fl.partition.dirichlet_alpha}), "
           f"{base.num_rounds} rounds")
  markdown = format_markdown(rows, title)
  with open(os.path.join(workdir, "comparison.md"), "w") as f:
    f.write(markdown)
  write_csv(rows, os.path.join(workdir, "comparison.csv"))
  print("\n" + markdown)
  print(f"written: {workdir}/comparison.md, {workdir}/comparison.csv "
        f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main)
