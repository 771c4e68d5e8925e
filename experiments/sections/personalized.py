"""Personalized FL (sweep ``personalized`` kinds: experiments/sweeps/fedaims.py).

A method's number is its personalized accuracy — every client's own model on
its own held-out data, averaged over the clients (FedAIMS Table 2) — at the
last evaluation, and averaged over the last three (a record's ``late``
metrics); mean and 95 % interval over seeds. The paired difference to FedAIMS
takes, for each seed, the method's last-three average minus FedAIMS's on the
same partition, held-out splits and client sampling. Where the records hold
each client's accuracy (``per_client``, from the runs' ``personal.jsonl``), a
second table shows how the clients spread: the worst client, the 10th
percentile, the median and the best, each averaged over seeds.
"""

from __future__ import annotations

import os

import numpy as np

from experiments.sections.common import (
  by_seed,
  figure_link,
  interval,
  labels_of,
  markdown_table,
  percent,
  provenance,
  select,
)
from experiments.sections.figures import plot_seed_bands
from experiments.stats import paired_difference

PERSONAL = "personal/accuracy_mean"
REFERENCE = "fedaims"
METHOD_NAMES = {
    "fedaims": "FedAIMS", "fedaims_full": "FedAIMS-Full", "fedaims_mu0": "FedAIMS, μ = 0",
    "fedaims_mask": "FedAIMS, absent classes masked", "fedper": "FedPer", "fedrod": "FedRoD",
    "fedbabu": "FedBABU", "fedavg": "FedAvg (global model)", "local": "Local",
    "fedrep": "FedRep", "lg_fedavg": "LG-FedAvg", "ditto": "Ditto", "fedala": "FedALA",
}
SKEW_NAMES = {"dir03": "Dir(0.3)", "dir01": "Dir(0.1)"}


def blocks(records: list[dict], figures: str) -> dict[str, str]:
  """Accuracy table with paired differences to FedAIMS, and the accuracy-vs-round figure."""
  sweep = records[0]["sweep"]
  rows, panels = [], {}
  for skew in labels_of(records, "grid"):
    runs = select(records, grid=skew)
    reference = by_seed(select(runs, method=REFERENCE), PERSONAL, "late")
    lines = {}
    for method in labels_of(runs, "method"):
      mine = select(runs, method=method)
      values = by_seed(mine, PERSONAL)
      diff = ("–" if method == REFERENCE else percent(
          paired_difference(by_seed(mine, PERSONAL, "late"), reference), signed=True))
      seeds = ", ".join(f"{100 * values[s]:.2f}" for s in sorted(values))
      spread = interval(mine, "personal/accuracy_std")
      rows.append([SKEW_NAMES.get(skew, skew), METHOD_NAMES.get(method, method),
                   percent(interval(mine, PERSONAL)), percent(interval(mine, PERSONAL, "late")),
                   diff, percent(interval(mine, PERSONAL, where="best")),
                   percent(spread), seeds])
      lines[METHOD_NAMES.get(method, method)] = mine
    panels[SKEW_NAMES.get(skew, skew)] = lines
  table = markdown_table(
      ["skew", "method", "personalized accuracy", "last 3 evaluations",
       "− FedAIMS (paired, last 3)", "best round", "std across clients", "final, per seed"],
      rows)
  figure = plot_seed_bands(panels, PERSONAL, os.path.join(figures, f"{sweep}.png"),
                           ylabel="personalized accuracy (%)",
                           title="Fashion-MNIST, ConvNet-3: clients' own models on their own "
                                 "data (mean over seeds, 95 % band)")
  out = {f"{sweep}/setup": provenance(records), f"{sweep}/table": table,
         f"{sweep}/figure": figure_link(figure, "personalized accuracy per round")}
  clients = client_table(records)
  if clients:
    out[f"{sweep}/clients"] = clients
  return out


def client_quantiles(record: dict) -> dict[str, float] | None:
  """Worst, 10th percentile, median and best of a record's per-client accuracies
  (clients without test data left out); ``None`` without ``per_client``."""
  accuracy = [a for a in record.get("per_client", {}).get("accuracy", []) if a is not None]
  if not accuracy:
    return None
  values = np.asarray(accuracy, np.float64)
  return {"worst": float(values.min()), "p10": float(np.percentile(values, 10)),
          "median": float(np.median(values)), "best": float(values.max()),
          "clients": len(values)}


def client_table(records: list[dict]) -> str:
  """Each method's spread across clients at the last evaluation, averaged over seeds;
  ``""`` where no record holds per-client accuracies."""
  rows = []
  for skew in labels_of(records, "grid"):
    runs = select(records, grid=skew)
    for method in labels_of(runs, "method"):
      found = [q for q in map(client_quantiles, select(runs, method=method)) if q]
      if not found:
        continue
      mean = {k: float(np.mean([q[k] for q in found])) for k in found[0]}
      rows.append([SKEW_NAMES.get(skew, skew), METHOD_NAMES.get(method, method),
                   f"{mean['clients']:.0f}", *(f"{100 * mean[k]:.2f}"
                                               for k in ("worst", "p10", "median", "best")),
                   str(len(found))])
  if not rows:
    return ""
  return markdown_table(["skew", "method", "clients", "worst client (%)", "10th percentile (%)",
                         "median (%)", "best client (%)", "seeds"], rows)
