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

  python -m experiments.personalized --workdir=runs/personalized     # Fashion-MNIST, ~30 min
  python -m experiments.personalized --local --workdir=/tmp/pfl      # digits, seconds a run
  python -m experiments.personalized --workdir=runs/pfl_cifar10 \
      --config=experiments/configs/personalized.py:cifar10 --skews=dir03,dir01,pat2 \
      --config.dataset.data_dir=/data/tensorflow_datasets

``--config`` is ``experiments/configs/personalized.py`` (``small`` by default: the
whole grid in about 30 minutes on 2 CPU cores; drop ``small`` for the paper's
300 rounds of 5 epochs). Runs resume, and a finished run is only read back, so
an interrupted driver continues where it stopped.
"""

from __future__ import annotations

import logging as std_logging
import os
import statistics
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs.personalized import apply_skew, get_config
from experiments.reporting import divergence_note, fmt, mean_std, train_unless_diverged, write_csv
from isr_jax.fl.registry import ALGORITHMS
from isr_jax.plotting import plot_learning_curves

# FedAIMS Table 2's rows, in its order, then FedAIMS-Full (Tables 5 and 7).
METHODS = ("local", "fedavg", "fedprox", "moon", "fedper", "fedrep", "lg_fedavg", "ditto",
           "fedbabu", "fedrod", "fedala", "fedaims", "fedaims_full")
ACCURACY = "personal/accuracy_mean"

_WORKDIR = flags.DEFINE_string("workdir", "runs/personalized", "Parent of every run's workdir.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/personalized.py:small", "Base config of every run.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), "FL algorithms (rows).")
_SKEWS = flags.DEFINE_list("skews", ["dir03", "dir01"],
                           "Label skews (columns): dir03, dir01, patK (K classes per client).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds.")
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
  for skew in skews:
    for method in methods:
      for seed in seeds:
        name = f"{skew}_{method}_seed{seed}"
        t0 = time.perf_counter()
        out = train_unless_diverged(run_config(base, method, skew, seed),
                                    os.path.join(workdir, name), f"{name:32s}")
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
        print(f"  {name:32s} personal acc {evals[-1][ACCURACY]:.4f} ± "
              f"{evals[-1]['personal/accuracy_std']:.4f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
  return results


def summarize(results, methods, skews) -> list[dict]:
  """One row per (method, skew): means over the seeds that finished."""
  rows = []
  for method in methods:
    for skew in skews:
      all_runs = results[(method, skew)]
      runs = [r for r in all_runs if r is not None]
      rounds = [r["round_s"] for r in runs if r["round_s"] is not None]
      rows.append({
          "method": method, "skew": skew, "seeds": len(runs),
          "diverged": len(all_runs) - len(runs),
          "accuracy": mean_std([r["final"][ACCURACY] for r in runs])[0],
          "client_std": mean_std([r["final"]["personal/accuracy_std"] for r in runs])[0],
          "seed_std": mean_std([r["final"][ACCURACY] for r in runs])[1],
          "weighted": mean_std([r["final"]["personal/accuracy_weighted"] for r in runs])[0],
          "best": mean_std([r["best"][ACCURACY] for r in runs])[0],
          "round": runs[0]["final"]["round"] if runs else None,
          "up_MB": runs[0]["up"] / 1e6 if runs else float("nan"),
          "down_MB": runs[0]["down"] / 1e6 if runs else float("nan"),
          "model_MB": runs[0]["sigma"] / 1e6 if runs else float("nan"),
          "round_s": statistics.mean(rounds) if rounds else float("nan"),
      })
  return rows


def accuracy_table(rows, methods, skews, title: str) -> str:
  by = {(r["method"], r["skew"]): r for r in rows}
  lines = [f"## {title}", "", "Personalized accuracy (%), mean ± std across clients, at the "
           "last evaluation" + (" (mean over seeds)" if rows[0]["seeds"] > 1 else "") + ".", "",
           "| method | " + " | ".join(skews) + " |", "|---|" + "---|" * len(skews)]
  for method in methods:
    cells = [fmt(100 * by[(method, s)]["accuracy"], 100 * by[(method, s)]["client_std"], 2)
             + divergence_note(by[(method, s)]) for s in skews]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def communication_table(rows, methods, skew: str) -> str:
  by = {r["method"]: r for r in rows if r["skew"] == skew}
  sigma = max(r["model_MB"] for r in by.values())
  lines = [f"## Communication per sampled client and round (Σ = {sigma:.3f} MB)", "",
           "| method | up MB | down MB | total MB | total / 2Σ |", "|---|---|---|---|---|"]
  for method in methods:
    r = by[method]
    total = r["up_MB"] + r["down_MB"]
    lines.append(f"| {method} | {r['up_MB']:.4f} | {r['down_MB']:.4f} | {total:.4f} | "
                 f"{total / (2 * sigma):.3f} |")
  return "\n".join(lines) + "\n"


def timing_table(rows, skews) -> str:
  by = {(r["method"], r["skew"]): r for r in rows}
  lines = ["## Seconds per round: FedAIMS vs FedAIMS-Full", "",
           "| skew | FedAIMS | FedAIMS-Full | reduction |", "|---|---|---|---|"]
  for skew in skews:
    a, full = by[("fedaims", skew)]["round_s"], by[("fedaims_full", skew)]["round_s"]
    lines.append(f"| {skew} | {a:.3f} s | {full:.3f} s | {100 * (1 - a / full):.1f} % |")
  return "\n".join(lines) + "\n"


def plot(results, methods, skews, path: str, title: str) -> None:
  """Personalized accuracy against rounds: a panel per skew, a line per method (seed 0)."""
  runs = {}
  for method in methods:
    for skew in skews:
      first = results[(method, skew)][0]
      if first is not None:
        runs.setdefault(method, []).extend(
            {"round": r["round"], f"personalized accuracy, {skew}": r[ACCURACY]}
            for r in first["history"] if ACCURACY in r)
  plot_learning_curves(runs, path, metrics=tuple(f"personalized accuracy, {s}" for s in skews),
                       title=title, columns=2)


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
  seeds = [int(s) for s in _SEEDS.value]
  base.fl.personalized_eval = "on"  # every method on each client's own test split
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  t0 = time.perf_counter()
  print(f"{len(methods)} methods × {len(skews)} label skews × {len(seeds)} seed(s) on "
        f"{base.dataset.name} ({base.model.name}), {_ROUNDS.value or base.num_rounds} rounds, "
        f"{base.fl.num_clients} clients ({base.fl.clients_per_round} per round)", flush=True)
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
  app.run(main)
