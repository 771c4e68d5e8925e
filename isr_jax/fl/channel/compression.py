"""Compressed uplinks: each client sends a compressed message, the server decodes it.

- ``qsgd``: stochastic ``b``-bit quantization (Alistarh et al., NeurIPS 2017):
  per bucket ``v`` of ``d`` consecutive values of a leaf,
  ``‖v‖ · sign(v_j) · ξ_j / s`` with ``s = 2^b − 1`` levels and ``ξ_j`` the
  stochastic rounding of ``s |v_j| / ‖v‖`` — unbiased, with a variance bound
  ``min(d/s², √d/s) ‖v‖²`` that grows with ``d``: the paper quantizes in buckets
  (its §3.1 and experiments). One norm per whole leaf (``bucket_size = 0``) makes
  a LeNet-5 dense layer's 48,000 values share one scale, and 2- and 4-bit QSGD
  then stalled FedAvg on Fashion-MNIST (experiments/RESULTS.md §5).
- ``top_k``: the ``k = max(1, ⌈fraction · n⌉)`` coordinates of largest magnitude
  per leaf of ``n`` values — biased, hence error feedback.

With ``error_feedback`` (either method; Stich, Cordonnier, Jaggi, NeurIPS 2018;
Karimireddy et al., ICML 2019) the client compresses ``v = m_t + e_t``, what it
has to send plus what it did not send before, and keeps
``e_{t+1} = v − C(v)`` in its state (``client_states["channel"]["residual"]``),
so it checkpoints and resumes.

``comm/up_bytes`` counts what is sent: QSGD one float32 norm per bucket and
``b + 1`` bits (level and sign) per value; top-k per leaf ``k`` float32 values
and ``k`` int32 indices. Leaves that are not floats travel raw.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_flag, check_integer, check_number, check_one_of

DEFAULTS = {
    "method": "none",  # qsgd | top_k
    "bits": 4,  # QSGD: b bits per level (s = 2^b − 1 levels), plus a sign bit
    "bucket_size": 512,  # QSGD: values sharing one norm (0: a whole leaf)
    "fraction": 0.01,  # top_k: share of each leaf's coordinates sent
    "error_feedback": True,  # keep what was not sent and add it next round
}
METHODS = ("none", "qsgd", "top_k")


class CompressionSpec(NamedTuple):
  """The compressor and its settings (see :data:`DEFAULTS`)."""

  method: str
  bits: int
  fraction: float
  error_feedback: bool
  bucket_size: int = 512


def settings(config) -> CompressionSpec | None:
  """``config.fl.compression`` checked; ``None`` when messages travel uncompressed."""
  c = config.fl.compression
  method = check_one_of(c.method, METHODS, "fl.compression.method")
  # One interval for every bad value, 0 and 17 alike; at 16 bits (and a sign) a
  # value already costs more than the float16 it stands for.
  check_number(c.bits, "fl.compression.bits", low=1, high=16)
  bits = check_integer(c.bits, "fl.compression.bits")
  fraction = check_number(c.fraction, "fl.compression.fraction", low=0, high=1, low_open=True)
  error_feedback = check_flag(c.error_feedback, "fl.compression.error_feedback")
  bucket = check_integer(c.bucket_size, "fl.compression.bucket_size", low=0)
  if method == "none":
    return None
  return CompressionSpec(method, bits, fraction, error_feedback, bucket)


def _is_float(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating)


def top_k_count(size: int, fraction: float) -> int:
  """``k = max(1, ⌈fraction · size⌉)`` coordinates of a leaf of ``size`` (at most ``size``).

  The product is rounded to 9 decimals first: ``0.07 · 100`` is ``7.000000000000001`` in
  floating point, and its ceiling would send one coordinate more than asked.
  """
  return min(max(1, math.ceil(round(fraction * size, 9))), size)


def qsgd(key: jax.Array, v: jax.Array, bits: int, bucket_size: int = 0) -> jax.Array:
  """QSGD's ``Q_s(v)`` (Alistarh et al. NeurIPS 2017, Eq. 3.1), ``s = 2^bits − 1`` levels,
  over buckets of ``bucket_size`` consecutive values of the flattened ``v`` (0: all).

  ``Q_s(v)_j = ‖v‖₂ · sign(v_j) · ξ_j / s`` with ``ξ_j = ⌊s|v_j|/‖v‖⌋ + Bernoulli(frac)``,
  the stochastic rounding of ``s|v_j|/‖v‖`` to a neighbouring level, so
  ``E[Q_s(v)] = v`` and (Lemma 3.1) ``E‖Q_s(v) − v‖² ≤ min(d/s², √d/s) ‖v‖²`` for
  a bucket of ``d`` values. ``v = 0`` gives zeros. Computed in float32, returned
  in ``v``'s dtype.
  """
  s = float(2 ** bits - 1)
  flat = v.astype(jnp.float32).reshape(-1)
  d = flat.size if bucket_size <= 0 else min(bucket_size, flat.size)
  buckets = -(-flat.size // d)
  x = jnp.pad(flat, (0, buckets * d - flat.size)).reshape(buckets, d)  # zeros: no norm
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=1, keepdims=True))
  scaled = s * jnp.abs(x) / jnp.where(norm > 0, norm, 1.0)
  low = jnp.floor(scaled)
  up = jax.random.uniform(key, x.shape) < scaled - low
  # |v_j| ≤ ‖v‖, but rounding of the norm could put scaled a hair above s: stay on the grid.
  xi = jnp.minimum(low + up.astype(jnp.float32), s)
  q = (jnp.sign(x) * xi * (norm / s)).reshape(-1)[:flat.size]
  return q.reshape(v.shape).astype(v.dtype)


def top_k(v: jax.Array, fraction: float) -> jax.Array:
  """``v`` with all but its ``k`` largest-magnitude coordinates zeroed (:func:`top_k_count`).

  ``k`` is static, so the leaf's shape and the program are too; ties keep the
  lowest indices (:func:`jax.lax.top_k`).
  """
  flat = v.reshape(-1)
  k = top_k_count(flat.size, fraction)
  if k == flat.size:
    return v
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(v.shape)


def compress(key: jax.Array, message: Any, residual: Any | None,
             spec: CompressionSpec) -> tuple[Any, Any | None]:
  """One client's message as the server decodes it, and its new error-feedback residual.

  Per float leaf ``v = m + e`` (``e`` the residual; ``v = m`` without error
  feedback), the leaf sent is ``C(v)`` (:func:`qsgd` or :func:`top_k`) and the
  residual kept is ``e⁺ = v − C(v)`` (error feedback, Stich et al. NeurIPS 2018,
  Algorithm 1; Karimireddy et al. ICML 2019, EF-SGD): what was not sent is sent
  later, so top-k's bias does not accumulate. Leaves that are not floats (counts)
  travel as they are, and their residual stays zero.

  Args:
    key: this client's key of the round; leaf ``i`` uses ``fold_in(key, i)``, so
      leaves get independent rounding noise.
    message: the client's message (a pytree).
    residual: ``e``, shaped like ``message``, or ``None`` without error feedback.
    spec: the compressor.

  Returns:
    ``(sent, new_residual)``; ``new_residual`` is ``None`` when ``residual`` is.
  """
  leaves, treedef = jax.tree.flatten(message)
  errors = [None] * len(leaves) if residual is None else treedef.flatten_up_to(residual)
  sent, kept = [], []
  for i, (m, e) in enumerate(zip(leaves, errors, strict=True)):
    if not _is_float(m):
      sent.append(m)
      kept.append(e)
      continue
    v = m if e is None else m + e.astype(m.dtype)
    if spec.method == "qsgd":
      c = qsgd(jax.random.fold_in(key, i), v, spec.bits, spec.bucket_size)
    else:
      c = top_k(v, spec.fraction)
    sent.append(c)
    kept.append(None if e is None else (v - c).astype(e.dtype))
  new_residual = None if residual is None else treedef.unflatten(kept)
  return treedef.unflatten(sent), new_residual


def leaf_bytes(leaf: Any, spec: CompressionSpec) -> int:
  """Bytes one message leaf (a ``ShapeDtypeStruct``) takes on the uplink, compressed.

  QSGD: a float32 norm per bucket and ``bits + 1`` bits (level and sign) per value,
  ``4 ⌈n / d⌉ + ⌈n (bits + 1) / 8⌉``; top-k: ``k`` float32 values and ``k`` int32 indices,
  ``8k`` (:func:`top_k_count`). Leaves that are not floats travel raw.
  """
  size = math.prod(leaf.shape)
  if not _is_float(leaf):
    return size * jnp.dtype(leaf.dtype).itemsize
  if spec.method == "qsgd":
    buckets = 1 if spec.bucket_size <= 0 else -(-size // spec.bucket_size)
    return 4 * buckets + math.ceil(size * (spec.bits + 1) / 8)
  return 8 * top_k_count(size, spec.fraction)
