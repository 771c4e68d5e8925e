"""MI-supervision adapters ``q^m(·; φ_m)`` (OmniISR paper §3.1, Eq. 3).

An adapter maps a tap feature ``[B, ..., C_m]`` to class logits. Its parameters
are the same for both tasks — a ``C_m × K`` matrix and a bias — and only the
application differs:

* classification (our generalisation; the paper defines only the dense case):
  global average pool over space/tokens, then the Dense layer;
* dense prediction: the 1×1 convolution at every position, then a bilinear
  resize (half-pixel centres, ``jax.image.resize``) to the label resolution.

Adapters are plain parameter dicts, not modules: they hold two arrays each, and
keeping them as data makes "aggregate the adapters or keep them per client" a
matter of which pytree they live in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from isr_jax.nn.dense import matmul
from isr_jax.nn.pooling import global_avg_pool

AdapterParams = dict[str, jax.Array]


def init_adapter(key: jax.Array, in_features: int, num_classes: int) -> AdapterParams:
  """LeCun-normal kernel (Flax's Dense default) and zero bias."""
  kernel = jax.nn.initializers.lecun_normal()(key, (in_features, num_classes), jnp.float32)
  return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def init_adapters(
    key: jax.Array, tap_channels: Mapping[str, int], num_classes: int
) -> dict[str, AdapterParams]:
  """One adapter per tap, keyed by tap name, with independent keys."""
  names = sorted(tap_channels)
  keys = jax.random.split(key, max(len(names), 1))
  return {
      n: init_adapter(k, tap_channels[n], num_classes)
      for n, k in zip(names, keys, strict=False)
  }


def apply_adapter(
    params: Mapping[str, jax.Array], z: jax.Array, label_shape: Sequence[int]
) -> jax.Array:
  """Adapter logits for a tap feature.

  Args:
    params: ``{"kernel": [C, K], "bias": [K]}``.
    z: tap feature ``[B, C]``, ``[B, T, C]`` or ``[B, h, w, C]``.
    label_shape: the label shape after the batch axis: ``()`` for classification,
      ``(H, W)`` for dense labels.

  Returns:
    ``[B, K]`` for classification, ``[B, H, W, K]`` for dense labels.
  """
  if len(label_shape) == 0:
    return matmul(global_avg_pool(z), params["kernel"]) + params["bias"]
  if z.ndim != 4:
    raise ValueError(
        f"a dense adapter needs a spatial tap [B, h, w, C]; got shape {tuple(z.shape)}"
    )
  q = matmul(z, params["kernel"]) + params["bias"]
  if q.shape[1:3] != tuple(label_shape):
    q = jax.image.resize(q, (q.shape[0], *label_shape, q.shape[-1]), method="bilinear")
  return q
