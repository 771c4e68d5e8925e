r"""FedAIMS Tables 2/4, 6 and 7: personalized FL methods × label skews × seeds.

Runs each method on each label skew from one base config and writes, in
``--workdir``:

* ``table2.md`` / ``table2.csv``: each method's personalized accuracy — the
  accuracy of every client's own model on its own held-out data, mean ± std
  across clients (FedAIMS's Table 2; Table 4 for ``patK`` skews), at the last
  evaluation, averaged over seeds; the CSV adds the best round's mean;
* ``table6.md``: bytes each sampled client sends and receives per round, against
  the model size Σ (FedAIMS Table 6);
* ``table7.md``: median seconds per round of FedAIMS and FedAIMS-Full (Table 7);
* ``personal_accuracy.png``: personalized accuracy against rounds, one panel per
  label skew, one line per method (seed 0).

  python -m experiments.personalized --workdir=runs/personalized     # Fashion-MNIST, ~27 min
  python -m experiments.personalized --local --workdir=/tmp/pfl      # digits, seconds a run
  python -m experiments.personalized --workdir=runs/pfl_cifar10 \
      --config=experiments/configs/personalized.py:cifar10 --skews=dir03,dir01,pat2 \
      --config.dataset.data_dir=/data/tensorflow_datasets

``--config`` is ``experiments/configs/personalized.py`` (``small`` by default: the
whole grid in about 27 minutes on 2 CPU cores; drop ``small`` for the paper's
300 rounds of 5 epochs). Runs resume, and a finished run is only read back, so
an interrupted driver continues where it stopped. The console shows one line
per run (``[k/N] name … personal accuracy … (time; grid ETA)``); SIGTERM or
Ctrl-C stops it with one ``stopped:`` line and exit code 128 + the signal's number.
"""

from __future__ import annotations

import logging as std_logging
import os
import statistics
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common_flags import SEEDS, WORKDIR
from experiments.config_files import parse_flags
from experiments.configs.personalized import apply_skew, get_config
from experiments.personalized_tables import (
  ACCURACY,
  METHODS,
  accuracy_table,
  communication_table,
  plot,
  summarize,
  timing_table,
)
from experiments.reporting import GridProgress, one_line_stops, train_unless_diverged, write_csv
from isr_jax.fl.registry import ALGORITHMS

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/personalized.py:small", "Base config of every run.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "FL algorithms (rows).")
_SKEWS = flags.DEFINE_list("skews", ["dir03", "dir01"],
                           "Label skews (columns): dir03, dir01, patK (K classes per client).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Rounds (default: the config's).")
_LOCAL = flags.DEFINE_bool("local", False, "The config's 'local' variant: digits, 2 rounds, "
                           "seconds a run.")


def run_config(base, method: str, skew: str, seed: int):
  config = base.copy_and_resolve_references()
  config.fl.algorithm = method
  apply_skew(config, skew)
  config.seed = seed
  if _ROUNDS.value:
    config.num_rounds = _ROUNDS.value
    config.eval_every = min(config.eval_every, _ROUNDS.value)
  return config


def run_all(base, workdir: str, methods, skews, seeds) -> dict:
  """``{(method, skew): [{"final", "best", "history", "sigma"} or None per seed]}``."""
  results: dict = {}
  grid = GridProgress(len(skews) * len(methods) * len(seeds))
  for skew in skews:
    for method in methods:
      for seed in seeds:
        name = f"{skew}_{method}_seed{seed}"
        grid.start(name)
        out = train_unless_diverged(run_config(base, method, skew, seed),
                                    os.path.join(workdir, name), "")
        grid.finish(out)
        if out is None:
          results.setdefault((method, skew), []).append(None)
          continue
        history = out["history"]
        evals = [r for r in history if ACCURACY in r]
        rounds = [r["time/round_s"] for r in history if "time/round_s" in r]
        last = next(r for r in reversed(history) if "comm/up_bytes" in r)
        clients = base.fl.clients_per_round
        results.setdefault((method, skew), []).append({
            "final": evals[-1], "best": max(evals, key=lambda r: r[ACCURACY]),
            "history": history, "round_s": statistics.median(rounds) if rounds else None,
            "up": last["comm/up_bytes"] / clients, "down": last["comm/down_bytes"] / clients,
            "sigma": 4 * sum(x.size for x in jax.tree.leaves(out["state"].params["model"])),
        })
  return results


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  base = get_config("local") if _LOCAL.value else _CONFIG.value
  methods, skews = _METHODS.value, _SKEWS.value
  unknown = [m for m in methods if m not in ALGORITHMS]
  if unknown:
    raise app.UsageError(f"--methods: {unknown} not among {sorted(ALGORITHMS)}")
  for skew in skews:
    try:
      apply_skew(base.copy_and_resolve_references(), skew)
    except ValueError as e:
      raise app.UsageError(f"--skews: {e}") from None
  seeds = [int(s) for s in (SEEDS.value or ["0"])]
  base.fl.personalized_eval = "on"  # every method on each client's own test split
  workdir = WORKDIR.value or "runs/personalized"
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  print(f"{len(methods)} methods × {len(skews)} label skews × {len(seeds)} seed(s) on "
        f"{base.dataset.name} ({base.model.name}), {_ROUNDS.value or base.num_rounds} rounds, "
        f"{base.fl.num_clients} clients ({base.fl.clients_per_round} per round)", flush=True)
  with one_line_stops():
    results = run_all(base, workdir, methods, skews, seeds)
  rows = summarize(results, methods, skews)
  title = (f"{base.dataset.name}, {base.model.name}, {base.fl.num_clients} clients, "
           f"{rows[0]['round']} rounds of {base.fl.local_epochs} local epoch(s)")
  write_csv(rows, os.path.join(workdir, "table2.csv"))
  tables = {"table2.md": accuracy_table(rows, methods, skews, title),
            "table6.md": communication_table(rows, methods, skews[0])}
  if {"fedaims", "fedaims_full"} <= set(methods):
    tables["table7.md"] = timing_table(rows, skews)
  for name, text in tables.items():
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)
    print("\n" + text)
  plot(results, methods, skews, os.path.join(workdir, "personal_accuracy.png"), title)
  print(f"written: {workdir}/{', '.join(tables)}, table2.csv, personal_accuracy.png "
        f"({time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
