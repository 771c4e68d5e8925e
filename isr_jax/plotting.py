"""Learning-curve and segmentation figures (matplotlib, headless).

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the
Agg canvas, never through ``pyplot``: importing this module must not switch the
backend of a notebook it is used in (pyplot's inline figures would stop showing).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

# Learning-curve panels in the order they are drawn, with their titles: a panel
# appears only when some run logged its metric (client drift: FL and hybrid;
# α and cos(g_CL, g_FL): hybrid; personalized accuracy: personalized FL).
CURVE_PANELS: dict[str, str] = {
    "test/accuracy": "test accuracy",
    "personal/accuracy_mean": "personalized accuracy (clients' own test data)",
    "test/loss": "test loss",
    "train/ce": "training cross-entropy",
    "train/loss": "training loss L_T",
    "fl/client_drift": "client drift",
    "hybrid/mix_weight": "hybrid α (cloud weight)",
    "hybrid/cos_cl_fl": "cos(g_CL, g_FL)",
}


def _points(records: Sequence[Mapping], metric: str) -> list[tuple[int, float]]:
  # Non-finite values reach metrics.jsonl as strings ("nan"); a plot skips them.
  return [(r["round"], float(r[metric])) for r in records
          if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]


def available_panels(runs: Mapping[str, Sequence[Mapping]],
                     candidates: Sequence[str] = tuple(CURVE_PANELS)) -> tuple[str, ...]:
  """The ``candidates`` that at least one run logged, in ``candidates``' order.

  ``train/loss`` is left out where every run's equals its ``train/ce`` (ISR off,
  no extra term): the panel would repeat the one before it.
  """
  present = [m for m in candidates if any(_points(recs, m) for recs in runs.values())]
  if "train/loss" in present and "train/ce" in present and all(
      _points(recs, "train/loss") == _points(recs, "train/ce") for recs in runs.values()):
    present.remove("train/loss")
  return tuple(present)


# A panel's metric whose spread across clients the run logged: its band shows that
# spread (how unevenly the clients fare), not the spread over seeds.
CLIENT_SPREAD = {"personal/accuracy_mean": "personal/accuracy_std"}
# Rounds up to this many get a tick each; more, integer ticks matplotlib chooses.
_MAX_ROUND_TICKS = 12
_ISR_SUFFIX = re.compile(r"\s*\+\s*isr$|[ _-]isr$", re.IGNORECASE)


def mean_curve(seeds: Sequence[Sequence[Mapping]], metric: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(rounds, mean, std)`` of ``metric`` over seeds, at the rounds every seed logged.

  ``std`` is the sample standard deviation over seeds (zeros for one seed).
  """
  per_seed = [dict(_points(records, metric)) for records in seeds]
  per_seed = [p for p in per_seed if p]
  if not per_seed:
    return np.zeros(0, int), np.zeros(0), np.zeros(0)
  rounds = sorted(set.intersection(*(set(p) for p in per_seed)))
  values = np.array([[p[r] for r in rounds] for p in per_seed], np.float64).reshape(
      len(per_seed), len(rounds))
  std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(rounds))
  return np.asarray(rounds), values.mean(axis=0), std


def _isr_pairs(labels: Sequence[str]) -> dict[str, tuple[int, bool]] | None:
  """``{label: (pair index, with ISR)}`` when the labels come as "X" / "X + ISR" pairs."""
  if len(labels) < 2 or not any(_ISR_SUFFIX.search(label) for label in labels):
    return None
  bases = list(dict.fromkeys(_ISR_SUFFIX.sub("", label) for label in labels))
  return {label: (bases.index(_ISR_SUFFIX.sub("", label)), bool(_ISR_SUFFIX.search(label)))
          for label in labels}


def _round_ticks(ax, rounds: set[int]) -> None:
  """Integer rounds on the x-axis, also for a series of one point."""
  if not rounds:
    return
  if len(rounds) <= _MAX_ROUND_TICKS:
    ax.set_xticks(sorted(rounds))
    if len(rounds) == 1:  # else matplotlib spans ±5 % around it, in fractional ticks
      (r,) = rounds
      ax.set_xlim(r - 1, r + 1)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def seed_curves_figure(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    *,
    metrics: Sequence[str] = ("test/accuracy", "train/ce"),
    title: str = "",
    columns: int = 3,
) -> Figure:
  """One panel per metric, one line per run: the mean over its seeds, with a ±std band.

  The band is the standard deviation over seeds; in the personalized-accuracy
  panel it is the spread across clients (the logged ``personal/accuracy_std``,
  averaged over seeds). Labels in "X" / "X + ISR" pairs share a hue: with ISR
  solid, without ISR dashed in a lighter shade and drawn on top, so that a
  pair whose curves coincide still shows both; the legend says so.

  Args:
    runs: ``{label: [metric records of each seed]}`` as written to metrics.jsonl.
    metrics: metric keys to plot (records lacking a key are skipped).
    title: figure title.
    columns: panels per row at most.
  """
  cols = max(1, min(columns, len(metrics)))
  rows = -(-len(metrics) // cols)
  fig = Figure(figsize=(5.0 * cols, 3.6 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  pairs = _isr_pairs(list(runs))
  # One colour per run in every panel: the colour cycle would restart in a panel
  # that only some runs logged (client drift: not CL).
  if pairs is not None:  # tab20 holds a dark and a light shade of each hue, in turn
    tab20 = matplotlib.colormaps["tab20"]
    colors = {label: tab20((2 * k + (0 if isr else 1)) % 20) for label, (k, isr) in pairs.items()}
  else:  # past 10 runs the default cycle would repeat: tab20's 20 colours instead
    palette = (lambda i: f"C{i}") if len(runs) <= 10 else matplotlib.colormaps["tab20"]
    colors = {label: palette(i % 20) for i, label in enumerate(runs)}
  most_seeds = max((len(seeds) for seeds in runs.values()), default=0)
  for ax, metric in zip(axes, metrics, strict=False):
    spread = CLIENT_SPREAD.get(metric)
    drawn_rounds: set[int] = set()
    for label, seeds in runs.items():
      xs, ys, band = mean_curve(seeds, metric)
      if not len(xs):
        continue
      if spread is not None:
        sx, spread_mean, _ = mean_curve(seeds, spread)
        if list(sx) == list(xs):
          band = spread_mean
      drawn_rounds.update(int(x) for x in xs)
      without_isr = pairs is not None and not pairs[label][1]
      ax.plot(xs, ys, label=label, color=colors[label], linestyle="--" if without_isr else "-",
              marker=("s" if without_isr else "o") if len(xs) < 30 else None, markersize=3,
              zorder=3 if without_isr else 2)
      if np.any(band > 0) and len(xs) == 1:  # a band of one point has no width: a bar
        ax.errorbar(xs, ys, yerr=band, color=colors[label], fmt="none", capsize=3,
                    linewidth=1, zorder=1)
      elif np.any(band > 0):
        ax.fill_between(xs, ys - band, ys + band, color=colors[label], alpha=0.15,
                        linewidth=0, zorder=1)
    panel_title = CURVE_PANELS.get(metric, metric)
    if spread is not None:
      panel_title += ", ± std across clients"
    ax.set_title(panel_title, fontsize=10)
    ax.set_xlabel("round")
    _round_ticks(ax, drawn_rounds)
    ax.set_ylabel(metric, fontsize=8)
    ax.grid(alpha=0.3)
  for ax in axes[len(metrics):]:
    ax.set_visible(False)
  # Every run in the legend, also one missing from the first panel.
  handles = {}
  for ax in axes[:len(metrics)]:
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
      handles.setdefault(label, handle)
  labels = [label for label in runs if label in handles]
  entries = [handles[label] for label in labels]
  if pairs is not None:
    entries += [Line2D([], [], color="0.4", linestyle="-", marker="o", markersize=3),
                Line2D([], [], color="0.4", linestyle="--", marker="s", markersize=3)]
    labels = labels + ["solid: with ISR", "dashed: without ISR"]
  axes[0].legend(entries, labels, fontsize=8 if len(labels) <= 8 else 6,
                 ncol=1 if len(labels) <= 8 else 2,
                 title=f"mean ± std over {most_seeds} seeds" if most_seeds > 1 else None,
                 title_fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10 if cols == 1 else 12)
  fig.tight_layout()
  return fig


def plot_seed_curves(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    path: str,
    *,
    metrics: Sequence[str] = ("test/accuracy", "train/ce"),
    title: str = "",
    columns: int = 3,
) -> str:
  """:func:`seed_curves_figure` saved as the PNG ``path``; returns ``path``."""
  seed_curves_figure(runs, metrics=metrics, title=title, columns=columns).savefig(path, dpi=120)
  return path


def plot_learning_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str,
    *,
    metrics: Sequence[str] = ("test/accuracy", "train/ce"),
    title: str = "",
    columns: int = 3,
) -> str:
  """One panel per metric, one line per run (one seed each); rounds on the x-axis.

  Args:
    runs: ``{label: metric records}`` as written to metrics.jsonl.
    path: output PNG path.
    metrics: metric keys to plot (records lacking a key are skipped).
    title: figure title.
    columns: panels per row at most.

  Returns:
    ``path``.
  """
  return plot_seed_curves({label: [records] for label, records in runs.items()}, path,
                          metrics=metrics, title=title, columns=columns)


def run_title(config: Mapping) -> str:
  """What a run is, from its config (``config.json``'s content), for a figure's title.

  E.g. ``FedAvg on digits (lenet5), Dirichlet α=0.3 over 20 clients, ISR on``;
  ``""`` for a config without a mode.
  """
  mode = config.get("mode")
  if not mode:
    return ""
  dataset, model = config.get("dataset", {}), config.get("model", {})
  where = f"{dataset.get('name', '?')} ({model.get('name', '?')})"
  isr = "ISR on" if config.get("isr", {}).get("enabled") else "ISR off"
  if mode == "cl":
    return f"centralized on {where}, {isr}"
  fl = config.get("fl", {})
  part = fl.get("partition", {})
  method = part.get("method", "?")
  skew = {"dirichlet": f"Dirichlet α={part.get('dirichlet_alpha')}",
          "shards": f"{part.get('shards_per_client')} shards per client",
          "pathological": f"{part.get('classes_per_client')} classes per client",
          "natural": "natural split", "iid": "IID"}.get(method, method)
  algorithm = str(fl.get("algorithm", "?"))
  algorithm = _ALGORITHM_NAMES.get(algorithm, algorithm)
  if mode == "hybrid":
    algorithm = f"hybrid CL–{algorithm}"
  return f"{algorithm} on {where}, {skew} over {fl.get('num_clients', '?')} clients, {isr}"


# How the papers write the algorithms the titles name most (the rest: as configured).
_ALGORITHM_NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD",
                    "fednova": "FedNova", "moon": "MOON", "fedaims": "FedAIMS",
                    "fedsol": "FedSoL", "ditto": "Ditto", "local": "Local", "fedper": "FedPer",
                    "fedrep": "FedRep", "fedbabu": "FedBABU", "fedrod": "FedRoD",
                    "apfl": "APFL", "fedexp": "FedExP", "feddyn": "FedDyn"}


def workdir_labels(workdirs: Sequence[str]) -> list[str]:
  """Each workdir's name, or its path below the common parent where names repeat."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(names)) == len(names):
    return names
  common = os.path.commonpath([os.path.abspath(w) for w in workdirs])
  return [os.path.relpath(os.path.abspath(w), common) for w in workdirs]


def plot_workdirs(workdirs: Sequence[str], path: str, *, labels: Sequence[str] | None = None,
                  metrics: Sequence[str] | None = None, title: str = "") -> tuple[str, ...]:
  """Overlays the learning curves of several workdirs (or draws one) into ``path``.

  Args:
    workdirs: run directories holding a ``metrics.jsonl``.
    path: output PNG path.
    labels: one legend entry per workdir; default: the workdirs' names.
    metrics: the panels; default: those of :data:`CURVE_PANELS` that any run logged.
    title: figure title; default: what the runs are (:func:`run_title` of their
      ``config.json``) where they share it, with the seed for a single run.

  Returns:
    The metric keys drawn, one per panel.

  Raises:
    ValueError: no workdir logged any of the metrics.
  """
  from isr_jax.metric_writer import read_metrics

  labels = list(labels) if labels else workdir_labels(workdirs)
  if len(labels) != len(workdirs):
    raise ValueError(f"{len(labels)} labels for {len(workdirs)} workdirs")
  runs = {label: read_metrics(w) for label, w in zip(labels, workdirs, strict=True)}
  panels = available_panels(runs, tuple(metrics) if metrics else tuple(CURVE_PANELS))
  if not panels:
    wanted = ", ".join(metrics or CURVE_PANELS)
    raise ValueError(f"nothing to plot: no round of {', '.join(workdirs)} logged {wanted}")
  plot_learning_curves(runs, path, metrics=panels, title=title or _shared_title(workdirs))
  return panels


def _shared_title(workdirs: Sequence[str]) -> str:
  """:func:`run_title` of the workdirs' configs where they all have the same one."""
  from isr_jax.workdir import CONFIG_FILE, read_json

  try:
    configs = [read_json(os.path.join(w, CONFIG_FILE)) or {} for w in workdirs]
  except (OSError, ValueError):  # a damaged config.json costs the figure its title only
    return ""
  titles = {run_title(c) for c in configs}
  if len(titles) != 1 or not next(iter(titles)):
    return ""
  title = titles.pop()
  if len(configs) == 1 and "seed" in configs[0]:
    title += f", seed {configs[0]['seed']}"
  return title


def label_colors(labels, num_classes: int, ignore_index: int | None = 255):
  """RGB image of a label map: tab20 colours per class, black for the ignore label."""
  palette = matplotlib.colormaps["tab20"](np.arange(max(num_classes, 1)) % 20)[:, :3]
  labels = np.asarray(labels)
  rgb = palette[np.clip(labels, 0, num_classes - 1)]
  if ignore_index is not None:
    rgb[labels == ignore_index] = 0.0
  return rgb


def plot_segmentation_examples(images, labels, predictions, path: str, *, num_classes: int,
                               class_names=(), ignore_index: int | None = 255,
                               title: str = "") -> str:
  """Rows of (input, ground truth, one prediction per entry of ``predictions``).

  Args:
    images: ``[N, H, W, 3]`` in [0, 1].
    labels: ``[N, H, W]`` class ids (``ignore_index`` shown black).
    predictions: ``{column title: [N, H, W] predicted ids}``.
    path: output PNG.
    num_classes: K, for the colours.
    class_names: optional legend entries.
    ignore_index: label drawn black.
    title: figure title.
  """
  cols = 2 + len(predictions)
  n = len(images)
  fig = Figure(figsize=(2.6 * cols, 1.5 * n + 0.6))
  axes = fig.subplots(n, cols, squeeze=False)
  for i in range(n):
    panels = [("input", np.clip(images[i], 0, 1)),
              ("ground truth", label_colors(labels[i], num_classes, ignore_index))]
    panels += [(name, label_colors(p[i], num_classes, ignore_index))
               for name, p in predictions.items()]
    for ax, (name, img) in zip(axes[i], panels, strict=True):
      ax.imshow(img, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(name, fontsize=9)
  if class_names:
    colors = label_colors(np.arange(num_classes), num_classes, None)
    handles = [Patch(color=colors[k], label=class_names[k]) for k in range(num_classes)]
    fig.legend(handles=handles, loc="lower center", ncol=min(num_classes, 6), fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.08 if class_names else 0, 1, 1))
  fig.savefig(path, dpi=110)
  return path
