"""Figures of RESULTS.md: a metric against rounds, mean over seeds with its 95 % band."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from experiments.sections.common import curves_by_seed
from experiments.stats import mean_interval


def plot_seed_bands(panels: Mapping[str, Mapping[str, Sequence[dict]]], metric: str, path: str,
                    *, ylabel: str, title: str, scale: float = 100.0) -> str:
  """One panel per entry of ``panels``, one line per method: the mean over seeds of
  ``metric`` at each evaluated round, shaded over its 95 % Student-t interval.

  Args:
    panels: ``{panel title: {line label: the runs' records (one per seed)}}``.
    metric: the key in each record's ``curve``.
    path: the PNG to write (its folder is created).
    ylabel: the y-axis label (``scale`` applied: percent by default).
    title: the figure's title.
    scale: multiplies every value (100 for accuracies in percent).

  Returns:
    ``path``.
  """
  cols = min(3, max(1, len(panels)))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(5.2 * cols, 3.8 * rows), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (panel, lines) in zip(axes, panels.items(), strict=False):
    for k, (label, records) in enumerate(lines.items()):
      curves = curves_by_seed(records, metric, lambda v: float(v) * scale)
      if not curves:
        continue
      rounds = sorted(set.intersection(*(set(r for r, _ in c) for c in curves)))
      values = [[dict(c)[r] for c in curves] for r in rounds]
      stats = [mean_interval(v) for v in values]
      mean = np.array([s.mean for s in stats])
      half = np.nan_to_num(np.array([s.half_width for s in stats]))
      color = f"C{k % 10}"
      ax.plot(rounds, mean, color=color, label=f"{label} (n = {len(curves)})")
      ax.fill_between(rounds, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
    ax.set_title(panel)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=7)
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(title)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  return path
