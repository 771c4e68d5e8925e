"""Why ISR does or does not help: measurements of a trained model's ISR terms and taps.

OmniISR supervises intermediate taps through small adapters (the MI term,
OmniISR paper Eq. 3, weighted by ``α_m`` in Eq. 5) and argues that this
reduces client drift (Lemma 2). Three measurements test the mechanism on a
trained model:

* :func:`term_gradient_cosines`: ``cos(∇_θ L_CE, ∇_θ α_m L_MI^m)`` per tap —
  whether the supervision pulls the backbone the way the output loss does
  (> 0), is orthogonal to it (≈ 0) or fights it (< 0);
* :func:`tap_feature_drift`: how far local training moves each tap's
  representation, relative to its size (client drift measured at the taps);
* :func:`adapter_accuracy`: how well each tap predicts the label through its
  adapter ``q^m`` (the variational bound of Eq. 3 in accuracy form).

All functions are pure and jit-friendly (``apply`` and ``spec`` are static).
Each takes an optional ``batch_size``: the examples are then processed in
chunks of that many under a ``lax.scan`` (the last one padded and masked),
bounding memory by one chunk, and the chunks are combined exactly — every
quantity is a ratio of sums over valid positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu
from jax import lax

from isr_jax.adapters import apply_adapter
from isr_jax.fl.algorithm import Batch
from isr_jax.losses import accuracy, cross_entropy, mi_loss
from isr_jax.taps import ISRSpec

Apply = Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
PyTree = Any


def valid_positions(y: jax.Array, mask: jax.Array, ignore_index: int | None = None) -> jax.Array:
  """How many positions :func:`isr_jax.losses.cross_entropy` averages over (float scalar).

  Examples with ``mask`` True for ``[B]`` labels; their pixels whose label is not
  ``ignore_index`` for ``[B, H, W]`` labels.
  """
  valid = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (y.ndim - 1)), y.shape)
  if ignore_index is not None:
    valid = valid & (y != ignore_index)
  return jnp.sum(valid.astype(jnp.float32))


def _sum_over_chunks(fn: Callable[..., PyTree], arrays: tuple, batch_size: int | None) -> PyTree:
  """``Σ_k fn(*chunk_k)`` over chunks of ``batch_size`` rows of ``arrays`` (``None`` leaves kept).

  Padding rows are zeros, so the mask among ``arrays`` marks them invalid; ``fn``
  must give sums (not means) for the total to be exact. ``batch_size`` None or at
  least the row count: ``fn(*arrays)`` in one piece.
  """
  n = jax.tree.leaves(arrays)[0].shape[0]
  if batch_size is None or batch_size >= n:
    return fn(*arrays)
  chunks = math.ceil(n / batch_size)

  def split(a):
    a = jnp.pad(a, [(0, chunks * batch_size - n)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((chunks, batch_size) + a.shape[1:])

  stacked = jax.tree.map(split, arrays)
  first = jax.tree.map(lambda a: a[0], stacked)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, *first))

  def step(total, chunk):
    return jax.tree.map(jnp.add, total, fn(*chunk)), None

  total, _ = lax.scan(step, zeros, stacked)
  return total


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den``, NaN where ``den`` is 0 (the quantity is undefined, not zero)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), jnp.nan)


def term_gradients(apply: Apply, params: PyTree, batch: Batch, spec: ISRSpec | None, *,
                   ignore_index: int | None = None) -> tuple[PyTree, dict[str, PyTree]]:
  """``(∇_θ L_CE, {m: ∇_θ α_m L_MI^m})``: each term's gradient w.r.t. the model parameters.

  ``θ = params["model"]``; ``L_CE`` is Eq. 2 on the logits and ``L_MI^m`` Eq. 3
  on tap ``m`` through its adapter ``params["adapters"][m]``, both the masked
  means of :mod:`isr_jax.losses` on ``batch``. One forward pass: each term's
  gradient is the forward pass's VJP applied to that term's cotangent on the
  logits or on its tap (zero elsewhere). The MI gradient is ``α_m ∇_z L_MI^m``
  pulled back through the backbone — what Eq. 5 sends the backbone, with or
  without ``spec.decouple_adapters`` (which changes only the adapter's
  gradient). Taps with ``α_m = 0`` have no term.
  """
  (logits, taps), pullback = jax.vjp(lambda model: apply(model, batch.x), params["model"])
  no_taps = jax.tree.map(jnp.zeros_like, taps)
  kw = dict(mask=batch.mask, ignore_index=ignore_index, weight=batch.weight)
  d_logits = jax.grad(lambda out: cross_entropy(out, batch.y, **kw))(logits)
  (g_ce,) = pullback((d_logits, no_taps))
  g_mi = {}
  for term in spec.terms if spec is not None else ():
    if term.mi_weight <= 0:
      continue
    adapter = params["adapters"][term.name]

    def weighted_mi(z, adapter=adapter, alpha=term.mi_weight):
      return alpha * mi_loss(adapter, z, batch.y, **kw)

    d_tap = jax.grad(weighted_mi)(taps[term.name])
    (g_mi[term.name],) = pullback((jnp.zeros_like(logits), {**no_taps, term.name: d_tap}))
  return g_ce, g_mi


def mean_term_gradients(apply: Apply, params: PyTree, batch: Batch, spec: ISRSpec | None, *,
                        ignore_index: int | None = None,
                        batch_size: int | None = None) -> tuple[PyTree, dict[str, PyTree]]:
  """:func:`term_gradients` over all of ``batch``, in chunks of ``batch_size``.

  Every term is a mean over the same valid positions, so the whole batch's
  gradient is ``Σ_k N_k g_k / Σ_k N_k`` over chunks ``k`` with ``N_k`` valid
  positions (:func:`valid_positions`).
  """

  def weighted(x, y, mask, weight):
    chunk = Batch(x, y, mask, weight)
    count = valid_positions(y, mask, ignore_index)
    grads = term_gradients(apply, params, chunk, spec, ignore_index=ignore_index)
    return otu.tree_scale(count, grads), count

  grads, count = _sum_over_chunks(weighted, tuple(batch), batch_size)
  return otu.tree_scale(1.0 / jnp.maximum(count, 1.0), grads)


def reached_leaves(grads: PyTree) -> PyTree:
  """A bool scalar per leaf: True where the gradient is not identically zero."""
  return jax.tree.map(lambda g: jnp.any(g != 0), grads)


def tree_cosine(a: PyTree, b: PyTree, where: PyTree | None = None) -> jax.Array:
  """``⟨a, b⟩ / (‖a‖ ‖b‖)`` over the leaves where ``where`` (bool scalars) is True; all if None.

  NaN when either vector is zero over those leaves (no direction to compare).
  """
  if where is None:
    where = jax.tree.map(lambda _: True, a)

  def total(f):
    return sum(jax.tree.leaves(jax.tree.map(
        lambda u, v, w: jnp.where(w, f(u, v), 0.0), a, b, where)))

  dot = total(lambda u, v: jnp.vdot(u, v))
  norm_a = total(lambda u, _: jnp.vdot(u, u))
  norm_b = total(lambda _, v: jnp.vdot(v, v))
  return _ratio(dot, jnp.sqrt(norm_a * norm_b))


def term_gradient_cosines(apply: Apply, params: PyTree, batch: Batch, spec: ISRSpec | None, *,
                          ignore_index: int | None = None,
                          batch_size: int | None = None) -> dict[str, jax.Array]:
  """``{m: cos(∇_θ L_CE, ∇_θ α_m L_MI^m)}`` for every tap with ``α_m > 0``.

  The gradients are :func:`mean_term_gradients`'. The cosine is taken over the
  backbone parameters the MI term reaches: the leaves where ``∇_θ L_MI^m`` is not
  identically zero (:func:`reached_leaves`). Every leaf after the tap (later
  blocks, the head) gets an exactly zero MI gradient, and counting them would
  only add ``L_CE``'s gradient there to ``‖∇L_CE‖``, making the cosine depend on
  how much of the network lies after the tap rather than on whether the two
  terms agree where both act. A leaf before the tap whose MI gradient happens to
  be exactly zero on the batch (a layer of dead units) is left out too, which
  changes only ``‖∇L_CE‖``, by that leaf's part. Empty for ``spec=None``.
  """
  g_ce, g_mi = mean_term_gradients(apply, params, batch, spec, ignore_index=ignore_index,
                                   batch_size=batch_size)
  return {m: tree_cosine(g_ce, g, reached_leaves(g)) for m, g in g_mi.items()}


def tap_feature_drift(apply: Apply, start_model: PyTree, end_model: PyTree, x: jax.Array,
                      mask: jax.Array, *, batch_size: int | None = None) -> dict[str, jax.Array]:
  """``{m: Σ_i ‖z_m(θ_end; x_i) − z_m(θ_start; x_i)‖² / Σ_i ‖z_m(θ_start; x_i)‖²}``.

  The relative drift of every tap the model returns (not only the ISR ones),
  summed over the examples with ``mask`` True (``‖·‖`` over all of a tap's
  positions and channels): how far training from ``θ_start`` to ``θ_end`` moves
  each representation — client drift (OmniISR Lemma 2) measured in feature
  space at the taps rather than in parameter space. NaN for a tap that is zero
  on every valid example.
  """

  def sums(x, mask):
    _, z_start = apply(start_model, x)
    _, z_end = apply(end_model, x)

    def per_example_sq(z):
      return jnp.sum(jnp.square(z.astype(jnp.float32)).reshape(z.shape[0], -1), axis=1)

    def masked(v):
      return jnp.sum(jnp.where(mask, v, 0.0))

    return {m: (masked(per_example_sq(z_end[m] - z_start[m])), masked(per_example_sq(z)))
            for m, z in z_start.items()}

  totals = _sum_over_chunks(sums, (x, mask), batch_size)
  return {m: _ratio(num, den) for m, (num, den) in totals.items()}


def adapter_accuracy(apply: Apply, params: PyTree, spec: ISRSpec | None, x: jax.Array,
                     y: jax.Array, mask: jax.Array, *, ignore_index: int | None = None,
                     batch_size: int | None = None) -> dict[str, jax.Array]:
  """``{m: top-1 accuracy of argmax q^m(·|z_m)}`` for every tap with an adapter (``α_m > 0``).

  The adapter (:func:`isr_jax.adapters.apply_adapter`) is applied to the tap of
  ``params["model"]``; accuracy is :func:`isr_jax.losses.accuracy`'s, over
  the valid positions (examples, or labelled pixels). Empty for ``spec=None``.
  """
  taps_with_adapters = () if spec is None else spec.adapter_taps

  def sums(x, y, mask):
    _, taps = apply(params["model"], x)
    count = valid_positions(y, mask, ignore_index)
    hits = {}
    for m in taps_with_adapters:
      q_logits = apply_adapter(params["adapters"][m], taps[m], y.shape[1:])
      hits[m] = count * accuracy(q_logits, y, mask=mask, ignore_index=ignore_index)
    return hits, count

  if not taps_with_adapters:
    return {}
  hits, count = _sum_over_chunks(sums, (x, y, mask), batch_size)
  return {m: _ratio(h, count) for m, h in hits.items()}
