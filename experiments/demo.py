r"""The main experiment on the embedded default data (``make demo``).

Trains the FedAvg CNN on scikit-learn's digits in CL, FL (FedAvg, Dirichlet
0.3 over 20 clients) and hybrid CL–FL mode, each without and with ISR, over
three seeds (the grid of experiments/sweeps/demo.py), then prints one table —
test accuracy per mode × ISR with 95 % intervals over the seeds and ISR's
paired effect, then the CL–FL gap without and with ISR (OmniISR §4.2.1, RQ4),
flagged when it shrank only because both ends fell — and writes the learning
curves to ``<workdir>/learning_curves.png``: the mean over the seeds the table
averages, with a ±std band, one hue per mode (dashed: without ISR).

  python -m experiments.demo --workdir=runs/demo [--rounds=60] [--seeds=0,1,2]

The console shows one line per run (``[k/12] name … result (time; grid ETA)``,
or ``finished earlier, reused`` for a run read back). The workdir is a sweep's
(its ``results.jsonl`` feeds experiments.report); run again, it reads the
finished runs back and trains only what is missing.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time

from absl import app, flags, logging

from experiments.common_flags import SEEDS, WORKDIR
from experiments.reporting import one_line_stops
from experiments.sections.demo import accuracies, format_table
from experiments.sweeps import expand
from experiments.sweeps.demo import get_sweep
from experiments.sweeps.runner import execute
from isr_jax.metric_writer import METRICS_FILE, read_metrics
from isr_jax.plotting import plot_seed_curves

_ROUNDS = flags.DEFINE_integer("rounds", None, "Override the number of rounds.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  workdir = WORKDIR.value or "runs/demo"
  sweep = get_sweep()
  command = f"python -m experiments.demo --workdir={workdir}"
  if _ROUNDS.value:
    sweep = sweep._replace(grids=[g._replace(settings={**g.settings, "num_rounds": _ROUNDS.value})
                                  for g in sweep.grids])
    command += f" --rounds={_ROUNDS.value}"
  seeds = None if SEEDS.value is None else [int(s) for s in SEEDS.value]
  if seeds is not None:
    command += f" --seeds={','.join(map(str, seeds))}"
  t0 = time.perf_counter()
  print("isr_jax demo: digits (scikit-learn), FedAvg CNN, CL / FL / hybrid × ISR off / on")
  runs = expand(sweep, seeds)
  with one_line_stops("the demo"):
    records = execute(workdir, sweep, runs, command)
  names = {r.name for r in runs}
  records = [r for r in records if r["name"] in names]
  done = [r for r in records if r["status"] == "done"]
  if not done:
    sys.exit("error: no run of the demo finished; the lines above say why")
  table = format_table(accuracies(records), int(done[0]["final"]["test/num_examples"]))
  # The seeds the table averages, not one of them: figure and table tell one story.
  finished = {r["name"] for r in done}
  curves: dict[str, list] = {}
  for r in runs:
    if r.name in finished and os.path.exists(os.path.join(workdir, r.name, METRICS_FILE)):
      label = f"{r.labels['grid'].upper()}{' + ISR' if r.labels['isr'] == 'on' else ''}"
      curves.setdefault(label, []).append(read_metrics(os.path.join(workdir, r.name)))
  seeds_shown = sorted({r.seed for r in runs if r.name in finished})
  png = plot_seed_curves(
      curves, os.path.join(workdir, "learning_curves.png"),
      title=f"digits (FedAvg CNN; FL: FedAvg, Dirichlet α=0.3 over 20 clients): mean over "
            f"seed{'s' if len(seeds_shown) > 1 else ''} {', '.join(map(str, seeds_shown))}")
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")
  print()
  print(table)
  print(f"\nlearning curves: {png}\ntable: {os.path.join(workdir, 'results.md')}"
        f"\ntotal time {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
  app.run(main)
