"""Test-set evaluation of the global model (methods §5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.data.packing import ClientData
from isr_jax.losses import cross_entropy
from isr_jax.metrics import confusion_matrix, summarize


def evaluate_classifier(apply, model_params, data: ClientData, *, num_classes: int,
                        ignore_index: int | None = None) -> dict[str, jax.Array]:
  """Accuracy, macro precision/recall/F1 and mean CE over every real example.

  Works unchanged for dense labels (then positions are pixels and the macro
  means are the segmentation metrics mPre/mRec/mF1/mIoU).

  Args:
    apply: ``(model_params, x) -> (logits, taps)``.
    model_params: the model's parameters.
    data: the test set packed as a single client ``[1, S, B, ...]``.
    num_classes: K.
    ignore_index: label excluded from every metric (255 for segmentation).

  Returns:
    ``{"accuracy", "mPre", "mRec", "mF1", "mIoU", "loss", "num_examples"}``.
  """

  def batch_stats(batch):
    x, y, mask = batch
    logits, _ = apply(model_params, x)
    cm = confusion_matrix(jnp.argmax(logits, -1), y, num_classes, mask=mask,
                          ignore_index=ignore_index)
    n = jnp.sum(mask)
    ce = cross_entropy(logits, y, mask=mask, ignore_index=ignore_index)
    return cm, ce * n, n

  cm, loss_sum, n = lax.map(batch_stats, (data.x[0], data.y[0], data.mask[0]))
  total = jnp.maximum(jnp.sum(n), 1)
  return {**summarize(cm.sum(axis=0)), "loss": jnp.sum(loss_sum) / total,
          "num_examples": jnp.sum(n)}
