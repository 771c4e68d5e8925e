"""Learning-curve and segmentation figures (matplotlib, headless).

Figures are built as ``matplotlib.figure.Figure`` objects and saved with the
Agg canvas, never through ``pyplot``: importing this module must not switch the
backend of a notebook it is used in (pyplot's inline figures would stop showing).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
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


def plot_learning_curves(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    path: str,
    *,
    metrics: Sequence[str] = ("test/accuracy", "train/ce"),
    title: str = "",
    columns: int = 3,
) -> str:
  """One panel per metric, one line per run; rounds on the x-axis.

  Args:
    runs: ``{label: metric records}`` as written to metrics.jsonl.
    path: output PNG path.
    metrics: metric keys to plot (records lacking a key are skipped).
    title: figure title.
    columns: panels per row at most.

  Returns:
    ``path``.
  """
  cols = max(1, min(columns, len(metrics)))
  rows = -(-len(metrics) // cols)
  fig = Figure(figsize=(5.0 * cols, 3.6 * rows))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  # Dashed = without ISR, when the labels say which runs have it (the demo's grid).
  dash = len(runs) > 1 and any("isr" in label.lower() for label in runs)
  # One colour per run in every panel: the colour cycle would restart in a panel
  # that only some runs logged (client drift: not CL).
  # Past 10 runs the default cycle would repeat: tab20's 20 colours instead.
  palette = (lambda i: f"C{i}") if len(runs) <= 10 else matplotlib.colormaps["tab20"]
  colors = {label: palette(i % 20) for i, label in enumerate(runs)}
  for ax, metric in zip(axes, metrics, strict=False):
    for label, records in runs.items():
      pts = _points(records, metric)
      if pts:
        xs, ys = zip(*pts, strict=True)
        style = "--" if dash and "isr" not in label.lower() else "-"
        ax.plot(xs, ys, label=label, color=colors[label], linestyle=style,
                marker="." if len(xs) < 30 else None)
    ax.set_title(CURVE_PANELS.get(metric, metric), fontsize=10)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
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
  axes[0].legend([handles[label] for label in labels], labels, fontsize=8 if len(labels) <= 8
                 else 6, ncol=1 if len(labels) <= 8 else 2)
  if title:
    fig.suptitle(title, fontsize=10 if cols == 1 else 12)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


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
    title: figure title.

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
  plot_learning_curves(runs, path, metrics=panels, title=title)
  return panels


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
