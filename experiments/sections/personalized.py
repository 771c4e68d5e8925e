"""Personalized FL (sweep ``personalized`` kinds: experiments/sweeps/fedaims.py).

A method's number is its personalized accuracy — every client's own model on
its own held-out data, averaged over the clients (FedAIMS Table 2) — at the
last evaluation, and averaged over the last three (a record's ``late``
metrics); mean and 95 % interval over seeds. The paired difference to FedAIMS
takes, for each seed, the method's last-three average minus FedAIMS's on the
same partition, held-out splits and client sampling.
"""

from __future__ import annotations

import os

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
  return {f"{sweep}/setup": provenance(records), f"{sweep}/table": table,
          f"{sweep}/figure": figure_link(figure, "personalized accuracy per round")}
