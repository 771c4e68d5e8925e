"""The channel's studies (sweep kind ``channel``: experiments/sweeps/channel.py).

Each table reads the global model's final test accuracy, mean and 95 %
interval over seeds, and each cell's paired difference (same seed: same
partition, initial model and sampling) to its grid's plain cell:
- robust rules × attacks (rows the rule, columns the attack and the share of
  sampled clients that attack), and each rule's cost without attackers;
- DP: ε spent after the run (the RDP accountant at the run's δ) and accuracy at
  each noise multiplier, with the figure of accuracy against ε;
- compression: MB sent up per round and accuracy per compressor;
- stragglers: FedAvg and FedNova with and without stragglers and dropouts.
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from experiments.sections.common import (
  by_seed,
  figure_link,
  interval,
  labels_of,
  markdown_table,
  metric,
  percent,
  provenance,
  select,
)
from experiments.stats import mean_interval, paired_difference

ACC = "test/accuracy"


def _done(runs: list[dict]) -> list[dict]:
  return [r for r in runs if r["status"] == "done"]


def _mean_metric(runs: list[dict], key: str) -> float | None:
  values = [v for r in _done(runs) if (v := metric(r, key)) is not None]
  return sum(values) / len(values) if values else None


def _accuracy(runs: list[dict]) -> str:
  """Mean ± 95 % interval of the finished runs, with how many diverged beside it."""
  diverged = sum(r["status"] == "diverged" for r in runs)
  if diverged and not _done(runs):
    return f"diverged ({diverged} of {len(runs)})"
  note = f" ({diverged} diverged)" if diverged else ""
  return percent(interval(runs, ACC)) + note


def _versus(runs: list[dict], reference: list[dict]) -> str:
  """The paired difference of ``runs`` to ``reference`` ("–" when they are the same runs)."""
  if {r["name"] for r in runs} == {r["name"] for r in reference}:
    return "–"
  return percent(paired_difference(by_seed(runs, ACC), by_seed(reference, ACC)), signed=True)


def robust_table(records: list[dict]) -> str:
  """Accuracy per rule (rows) and attack (columns), and each rule's paired cost to the
  plain mean without attackers."""
  attacks = labels_of(records, "attack")
  rows = []
  clean_mean = select(records, rule="mean", attack="none")
  for rule in labels_of(records, "rule"):
    cells = [_accuracy(select(records, rule=rule, attack=a)) for a in attacks]
    clean = select(records, rule=rule, attack="none")
    rows.append([rule, *cells, _versus(clean, clean_mean) if rule != "mean" else "–"])
  header = ["rule", *(f"{a} (accuracy %)" for a in attacks), "no attack: − mean's"]
  return markdown_table(header, rows)


def dp_table(records: list[dict]) -> tuple[str, list[tuple[float, list[float], str]]]:
  """``(table, points)``: per noise level ε spent and accuracy; ``points`` feed the figure."""
  off = select(records, noise="off")
  rows, points = [], []
  for noise in labels_of(records, "noise"):
    runs = select(records, noise=noise)
    eps = _mean_metric(runs, "dp/epsilon")
    eps_text = "∞ (no DP)" if noise == "off" else ("–" if eps is None else f"{eps:.3g}")
    clipped = _mean_metric(runs, "dp/clipped_fraction")
    rows.append([noise, eps_text, _accuracy(runs), _versus(runs, off),
                 "–" if clipped is None else f"{100 * clipped:.0f}"])
    if eps is not None:
      points.append((eps, list(by_seed(runs, ACC).values()), noise))
  header = ["noise multiplier", "ε (δ = 1e-5)", "accuracy %", "− no DP (paired)",
            "clients clipped in the last round %"]
  return markdown_table(header, rows), points


def plot_accuracy_against_epsilon(points, reference: list[float], path: str) -> str:
  """Accuracy (mean over seeds, 95 % interval) against ε on a log axis; no DP as a line."""
  fig = Figure(figsize=(5.6, 3.8), layout="constrained")
  ax = fig.subplots()
  for eps, values, label in sorted(points):
    iv = mean_interval(values)
    half = 0.0 if math.isnan(iv.half_width) else 100 * iv.half_width
    ax.errorbar([eps], [100 * iv.mean], yerr=[[half], [half]], fmt="o", capsize=4, color="C0")
    ax.annotate(label, (eps, 100 * iv.mean), textcoords="offset points", xytext=(6, 4),
                fontsize=8)
  if points:
    xs = sorted(p[0] for p in points)
    means = [100 * mean_interval(v).mean for _, v, _ in sorted(points)]
    ax.plot(xs, means, color="C0", alpha=0.5)
  if reference:
    ax.axhline(100 * float(np.mean(reference)), color="C3", linestyle="--",
               label=f"no DP (n = {len(reference)})")
    ax.legend(fontsize=8)
  ax.set_xscale("log")
  ax.set_xlabel("ε spent (δ = 1e-5, RDP accountant)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("DP-FedAvg on Fashion-MNIST: accuracy against ε")
  ax.grid(alpha=0.3)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  return path


def compression_table(records: list[dict]) -> str:
  none = select(records, compressor="none")
  base = _mean_metric(none, "comm/up_bytes")
  rows = []
  for name in labels_of(records, "compressor"):
    runs = select(records, compressor=name)
    up = _mean_metric(runs, "comm/up_bytes")
    ratio = "–" if up is None or not base else f"{base / up:.1f}×"
    rows.append([name, "–" if up is None else f"{up / 1e6:.3f}", ratio,
                 _accuracy(runs), _versus(runs, none)])
  return markdown_table(["compressor", "MB up / round", "smaller by", "accuracy %",
                         "− uncompressed (paired)"], rows)


def stragglers_table(records: list[dict]) -> str:
  rows = []
  for algorithm in labels_of(records, "algorithm"):
    full = select(records, algorithm=algorithm, work="all")
    for work in labels_of(records, "work"):
      runs = select(records, algorithm=algorithm, work=work)
      steps = _mean_metric(runs, "fl/local_steps")
      rows.append([algorithm, work, "–" if steps is None else f"{steps:.1f}",
                   _accuracy(runs),
                   _versus(runs, full)])
  return markdown_table(["algorithm", "work", "local steps per client (last round)",
                         "accuracy %", "− all work (paired)"], rows)


def blocks(records: list[dict], figures: str) -> dict[str, str]:
  sweep = records[0]["sweep"]
  by_grid = {g: select(records, grid=g) for g in labels_of(records, "grid")}
  out = {f"{sweep}/setup": provenance(records)}
  if by_grid.get("robust"):
    out[f"{sweep}/robust"] = robust_table(by_grid["robust"])
  if by_grid.get("dp"):
    table, points = dp_table(by_grid["dp"])
    out[f"{sweep}/dp"] = table
    path = plot_accuracy_against_epsilon(
        points, list(by_seed(select(by_grid["dp"], noise="off"), ACC).values()),
        os.path.join(figures, f"{sweep}_dp_epsilon.png"))
    out[f"{sweep}/dp_figure"] = figure_link(path, "accuracy against ε")
  if by_grid.get("compression"):
    out[f"{sweep}/compression"] = compression_table(by_grid["compression"])
  if by_grid.get("stragglers"):
    out[f"{sweep}/stragglers"] = stragglers_table(by_grid["stragglers"])
  return out
