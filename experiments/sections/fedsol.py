"""FedSoL's comparison (sweep kind ``fedsol``: experiments/sweeps/fedsol.py).

The global model's test accuracy averaged over the last three evaluations (a
record's ``late`` metrics; the final and the best evaluated round beside it),
mean and 95 % interval over seeds, the paired difference of each method to
FedSoL at the paper's ρ on that average, and the top Hessian eigenvalue λ_max of the
final global model's training loss (``experiments.flatness``) where measured:
FedSoL argues that its perturbation finds flatter minima (smaller λ_max).
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
from experiments.stats import mean_interval, paired_difference

ACC = "test/accuracy"
REFERENCE = "fedsol"
METHOD_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx (μ = 1)", "fedsam": "FedSAM (ρ = 0.1)",
                "fedasam": "FedASAM (ρ = 1.0)", "fedntd": "FedNTD (β = 1, τ = 1)",
                "fedsol": "FedSoL (ρ = 2.0, paper)", "fedsol_rho0.5": "FedSoL (ρ = 0.5)",
                "fedsol_rho0.1": "FedSoL (ρ = 0.1)"}
SKEW_NAMES = {"dir01": "Dir(0.1)", "s2": "2 shards per client (#C ≤ 2)"}


def _eigenvalues(runs: list[dict]) -> list[float]:
  return [r["flatness"]["top_hessian_eigenvalue"] for r in runs
          if r["status"] == "done" and r.get("flatness", {}).get("top_hessian_eigenvalue")]


def blocks(records: list[dict], figures: str) -> dict[str, str]:
  """Accuracy / flatness table with paired differences to FedSoL, and the accuracy figure."""
  sweep = records[0]["sweep"]
  rows, panels = [], {}
  for skew in labels_of(records, "grid"):
    runs = select(records, grid=skew)
    reference = by_seed(select(runs, method=REFERENCE), ACC, "late")
    lines = {}
    for method in labels_of(runs, "method"):
      mine = select(runs, method=method)
      diff = ("–" if method == REFERENCE
              else percent(paired_difference(by_seed(mine, ACC, "late"), reference), signed=True))
      eig = mean_interval(_eigenvalues(mine))
      rows.append([SKEW_NAMES.get(skew, skew), METHOD_NAMES.get(method, method),
                   percent(interval(mine, ACC, "late")), diff, percent(interval(mine, ACC)),
                   percent(interval(mine, ACC, "best")), eig.format(digits=1)])
      lines[METHOD_NAMES.get(method, method)] = mine
    panels[SKEW_NAMES.get(skew, skew)] = lines
  table = markdown_table(["skew", "method", "test accuracy, last 3 evaluations",
                          "− FedSoL (paired)", "final round", "best round",
                          "λ_max of the global model"], rows)
  figure = plot_seed_bands(panels, ACC, os.path.join(figures, f"{sweep}_accuracy.png"),
                           ylabel="test accuracy (%)",
                           title="Fashion-MNIST, 5 local epochs: global test accuracy "
                                 "(mean over seeds, 95 % band)")
  return {f"{sweep}/setup": provenance(records), f"{sweep}/table": table,
          f"{sweep}/figure": figure_link(figure, "FedSoL and baselines: test accuracy per round")}
