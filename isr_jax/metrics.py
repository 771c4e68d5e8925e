"""Confusion-matrix metrics (methods §5), accumulated on device.

A confusion matrix ``cm[true, pred]`` is summed over batches (classification
examples or segmentation pixels); every metric is a pure function of it:
per-class precision, recall, F1 and IoU, their means over the classes that are
present (in the ground truth or the predictions — a class absent from both is
left out of every mean), and overall accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def confusion_matrix(pred: jax.Array, labels: jax.Array, num_classes: int, *,
                     mask: jax.Array | None = None,
                     ignore_index: int | None = None) -> jax.Array:
  """``[K, K]`` int32 counts of (true, predicted) over valid positions.

  Args:
    pred: predicted class per position, any shape.
    labels: true class per position, same shape.
    num_classes: K.
    mask: optional per-example validity ``[B]`` (broadcast over positions).
    ignore_index: label value that is not counted (255 for segmentation).
  """
  valid = jnp.ones(labels.shape, bool)
  if mask is not None:
    valid = valid & mask.reshape(mask.shape + (1,) * (labels.ndim - 1))
  if ignore_index is not None:
    valid = valid & (labels != ignore_index)
  valid = valid & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + pred, 0).ravel()
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(
      valid.ravel().astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def _safe_div(a, b):
  return jnp.where(b > 0, a / jnp.where(b > 0, b, 1), 0.0)


def per_class(cm: jax.Array) -> dict[str, jax.Array]:
  """Per-class precision, recall, F1, IoU and the ``present`` mask."""
  cm = cm.astype(jnp.float32)
  tp = jnp.diag(cm)
  gt = cm.sum(axis=1)
  pr = cm.sum(axis=0)
  return {
      "precision": _safe_div(tp, pr),
      "recall": _safe_div(tp, gt),
      "f1": _safe_div(2 * tp, gt + pr),
      "iou": _safe_div(tp, gt + pr - tp),
      "present": (gt + pr) > 0,
  }


def summarize(cm: jax.Array) -> dict[str, jax.Array]:
  """Accuracy and the means over present classes: mPre, mRec, mF1, mIoU."""
  pc = per_class(cm)
  present = pc["present"].astype(jnp.float32)
  n = jnp.maximum(present.sum(), 1.0)
  mean = lambda v: jnp.sum(v * present) / n
  total = jnp.maximum(cm.sum(), 1)
  return {
      "accuracy": jnp.trace(cm) / total,
      "mPre": mean(pc["precision"]),
      "mRec": mean(pc["recall"]),
      "mF1": mean(pc["f1"]),
      "mIoU": mean(pc["iou"]),
  }
