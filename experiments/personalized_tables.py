"""FedAIMS's tables and figure from the personalized driver's runs (used by
:mod:`experiments.personalized`; no flags, so tests import it)."""

from __future__ import annotations

import statistics

from experiments.reporting import divergence_note, fmt, mean_std
from isr_jax.plotting import plot_seed_curves

# FedAIMS Table 2's rows, in its order, then FedAIMS-Full (Tables 5 and 7).
METHODS = ("local", "fedavg", "fedprox", "moon", "fedper", "fedrep", "lg_fedavg", "ditto",
           "fedbabu", "fedrod", "fedala", "fedaims", "fedaims_full")
ACCURACY = "personal/accuracy_mean"


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
  """Personalized accuracy against rounds: a panel per skew, a line per method, the mean
  over the seeds the tables average with a ±std band over seeds."""
  runs = {}
  for method in methods:
    for skew in skews:
      panel = f"personalized accuracy, {skew}"
      seeds = [[{"round": r["round"], panel: r[ACCURACY]} for r in run["history"]
                if ACCURACY in r] for run in results[(method, skew)] if run is not None]
      for k, seed in enumerate(seeds):  # one record list per seed, panels side by side
        if len(runs.setdefault(method, [])) <= k:
          runs[method].append([])
        runs[method][k].extend(seed)
  plot_seed_curves(runs, path, metrics=tuple(f"personalized accuracy, {s}" for s in skews),
                   title=title, columns=2)
