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
and ``classes2`` (#C = 2). The console shows one line per run with the grid's
ETA; SIGTERM or Ctrl-C stops it with one ``stopped:`` line and exit code 128 +
the signal's number, and the same command resumes.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import app, flags, logging

from experiments.common_flags import WORKDIR
from experiments.configs import cross_silo
from experiments.cross_silo_table import format_markdown, parse_run, run_dir, summarize_run
from experiments.reporting import GridProgress, one_line_stops, train_unless_diverged, write_csv

DEFAULT_RUNS = ("dirichlet:fedavg:0", "dirichlet:fedprox:0", "dirichlet:scaffold:0",
                "dirichlet:fednova:0", "classes2:fedavg:0", "dirichlet:fedavg:1")

_RUNS = flags.DEFINE_list("runs", list(DEFAULT_RUNS), "skew:algorithm:seed of each run.")
_ROUNDS = flags.DEFINE_integer("rounds", 50, "Rounds per run (the literature runs 50).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Fashion-MNIST IDX directory (default: the Debian package's).")
_LOCAL = flags.DEFINE_bool("local", False, "The preset's `local` variant: a run of seconds.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False,
                                 "Only tabulate the workdirs' metrics; train nothing.")

def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  try:
    runs = [parse_run(r) for r in _RUNS.value]
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  workdir = WORKDIR.value or "runs/cross_silo"
  os.makedirs(workdir, exist_ok=True)
  rows = []
  grid = GridProgress(len(runs))
  for skew, algorithm, seed in runs:
    path = run_dir(workdir, skew, algorithm, seed)
    if not _REPORT_ONLY.value:
      config = cross_silo.get_config(skew + (",local" if _LOCAL.value else ""))
      config.dataset.data_dir = _DATA_DIR.value
      config.fl.algorithm = algorithm
      config.seed = seed
      config.num_rounds = _ROUNDS.value
      grid.start(os.path.basename(path))
      with one_line_stops():
        grid.finish(train_unless_diverged(config, path, ""))
    rows.append({"skew": skew, "algorithm": algorithm, "seed": seed,
                 **summarize_run(path)})
    if _REPORT_ONLY.value:
      print(format_markdown(rows[-1:]).splitlines()[-1], flush=True)
  markdown = format_markdown(rows)
  with open(os.path.join(workdir, "cross_silo.md"), "w") as f:
    f.write(markdown)
  write_csv(rows, os.path.join(workdir, "cross_silo.csv"))
  print("\n" + markdown)


if __name__ == "__main__":
  app.run(main)
