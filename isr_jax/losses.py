"""The OmniISR objective: output CE, MI supervision, negative entropy (OmniISR paper §3.1).

Every term is normalised the same way (methods §1): the mean over valid positions,
where a position is an example (classification, ``[B, C]`` features) or a pixel
/ token (dense features, dense labels). Positions whose example is masked out
(padding in a packed client batch) or whose label equals ``ignore_index`` are
excluded. The paper sums over pixels instead; that differs by the constant
``H·W``, which the weights α, λ absorb.

All functions are pure and shape-polymorphic, so ``isr_loss`` can be used
directly as ``jax.value_and_grad(loss, has_aux=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.adapters import apply_adapter
from isr_jax.errors import ConfigError
from isr_jax.taps import ISRSpec


def _example_mask(mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
  """Broadcasts a per-example ``[B]`` mask over the trailing position axes of ``shape``."""
  if mask is None:
    return None
  return jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (len(shape) - 1)), shape)


def _broadcast_weight(weight: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Importance weights per example ``[B]`` or per position (``shape`` itself).

  A per-pixel weight applied to a term at another resolution (negative entropy
  on a coarser tap) becomes its example's mean weight.
  """
  if weight.shape == tuple(shape):
    return weight
  if weight.ndim > 1:
    weight = weight.reshape(weight.shape[0], -1).mean(axis=1)
  return _example_mask(weight, shape)


def masked_mean(values: jax.Array, valid: jax.Array | None,
                weight: jax.Array | None = None) -> jax.Array:
  """``Σ w·v / #valid``: importance weights scale terms but not the count (FedIR).

  ``valid`` has the shape of ``values``; 0 when nothing is valid.
  """
  if weight is not None:
    values = values * _broadcast_weight(weight, values.shape)
  if valid is None:
    return jnp.mean(values)
  count = jnp.sum(valid.astype(values.dtype))
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1.0)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    ignore_index: int | None = None,
    weight: jax.Array | None = None,
) -> jax.Array:
  """Eq. 2: ``mean_{i,p} −log softmax(logits)_{p, y_{i,p}}`` over valid positions.

  Args:
    logits: ``[B, K]`` or ``[B, H, W, K]``.
    labels: integer ``[B]`` or ``[B, H, W]``.
    mask: optional per-example validity ``[B]`` (False for padding).
    ignore_index: label value excluded from the mean (255 for segmentation).
    weight: optional importance weight per example ``[B]`` or per position
      (the labels' shape); the mean still divides by the number of valid
      positions.

  Returns:
    Scalar mean negative log-likelihood (0 when nothing is valid).
  """
  valid = _example_mask(mask, labels.shape)
  if ignore_index is not None:
    keep = labels != ignore_index
    valid = keep if valid is None else valid & keep
    labels = jnp.where(keep, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return masked_mean(nll, valid, weight)


def accuracy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    ignore_index: int | None = None,
) -> jax.Array:
  """Top-1 accuracy over the positions :func:`cross_entropy` counts (examples or pixels)."""
  valid = _example_mask(mask, labels.shape)
  if ignore_index is not None:
    keep = labels != ignore_index
    valid = keep if valid is None else valid & keep
  hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return masked_mean(hits, valid)


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: float) -> jax.Array:
  """The identity whose cotangent is multiplied by ``scale`` (a constant, not differentiated)."""
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, g):
  return g * jnp.asarray(scale, g.dtype), None


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def mi_loss(
    adapter_params: Mapping[str, jax.Array],
    z: jax.Array,
    labels: jax.Array,
    *,
    mask: jax.Array | None = None,
    ignore_index: int | None = None,
    weight: jax.Array | None = None,
) -> jax.Array:
  """Eq. 3: MI supervision, the variational bound ``H(Y|Z^m) <= E[−log q^m(y|z^m)]``.

  The adapter ``q^m`` is applied to the tap feature ``z`` (see
  :func:`isr_jax.adapters.apply_adapter`: GAP + Dense for classification, 1×1
  conv + bilinear resize to the label resolution for dense labels), then scored
  with :func:`cross_entropy`.
  """
  q_logits = apply_adapter(adapter_params, z, labels.shape[1:])
  return cross_entropy(q_logits, labels, mask=mask, ignore_index=ignore_index, weight=weight)


@jax.custom_vjp
def _entropy_per_position(z: jax.Array) -> jax.Array:
  """``Σ_c s_c log s_c`` over the last axis, ``s = softmax(z)``."""
  log_s = jax.nn.log_softmax(z, axis=-1)
  return jnp.sum(jnp.exp(log_s) * log_s, axis=-1)


def _entropy_fwd(z):
  log_s = jax.nn.log_softmax(z, axis=-1)
  ne = jnp.sum(jnp.exp(log_s) * log_s, axis=-1)
  return ne, (log_s, ne)


def _entropy_bwd(residuals, g):
  # ∂/∂z_j Σ_c s_c log s_c = s_j (log s_j − Σ_c s_c log s_c): one fused pass over
  # the tap, where autodiff of log_softmax∘exp re-reads it several times. Taps are
  # the largest activations, so this is most of ISR's cost (benchmarks/RESULTS.md).
  log_s, ne = residuals
  return (g[..., None] * jnp.exp(log_s) * (log_s - ne[..., None]),)


_entropy_per_position.defvjp(_entropy_fwd, _entropy_bwd)


def negative_entropy(
    z: jax.Array, *, mask: jax.Array | None = None, normalize: bool = False,
    weight: jax.Array | None = None,
) -> jax.Array:
  """Eq. 4: ``mean_{i,p} Σ_c s_c log s_c`` with ``s = softmax(z_{i,p})`` over channels.

  Lies in ``[−log C, 0]``; minimising it maximises the entropy of the latent.
  Positions are examples for ``[B, C]``, tokens for ``[B, T, C]`` and pixels for
  ``[B, h, w, C]``.

  Args:
    z: tap feature, channels last.
    mask: optional per-example validity ``[B]``.
    normalize: divide by ``log C`` so that λ is comparable across taps.
    weight: optional per-example importance weight ``[B]``.
  """
  ne = _entropy_per_position(z)
  if normalize:
    ne = ne / jnp.log(z.shape[-1])
  return masked_mean(ne, _example_mask(mask, ne.shape), weight)


def isr_loss(
    logits: jax.Array,
    taps: Mapping[str, jax.Array],
    labels: jax.Array,
    adapter_params: Mapping[str, Mapping[str, jax.Array]],
    spec: ISRSpec | None,
    *,
    mask: jax.Array | None = None,
    ignore_index: int | None = None,
    weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eq. 5: ``L_T = L_CE + Σ_m (α_m L_MI^m + λ_m L_NE^m)``.

  Terms whose weight is exactly zero are not computed, so with no taps (or all
  weights zero) this is *exactly* :func:`cross_entropy` — ISR off is plain
  training, bit for bit.

  With ``spec.decouple_adapters`` (the default) the value is the same but the
  gradient of the MI term is split: the backbone receives ``α_m ∇_z L_MI^m``
  (through the tap ``z^m``), exactly as in Eq. 5, while the adapter receives
  ``∇_φ L_MI^m`` unscaled — the gradient of
  ``L_CE + Σ_m (α_m L_MI^m(sg φ_m, z^m) + L_MI^m(φ_m, sg z^m) + λ_m L_NE^m)``.
  Differentiated literally, Eq. 5 gives the adapter ``α_m ∇_φ L_MI^m``: under
  SGD its learning rate is ``α_m η`` and at α = 0.1 it barely trains in FL
  (Adam, the paper's CL optimizer, is invariant to that scale). α_m then
  weighs only the supervision's pull on the backbone.

  Args:
    logits: output of the model's head.
    taps: the model's named intermediate features.
    labels: integer labels ``[B]`` or ``[B, H, W]``.
    adapter_params: ``{tap_name: adapter params}`` for every tap with ``α_m > 0``.
    spec: which taps and with which weights; ``None`` means ISR off.
    mask: optional per-example validity ``[B]``.
    ignore_index: label excluded from CE and MI (255 for segmentation).
    weight: optional per-example importance weight ``[B]`` for every term.

  Returns:
    ``(L_T, aux)`` with ``aux`` holding ``ce``, ``mi/<tap>``, the adapter's
    accuracy ``mi_accuracy/<tap>``, ``ne/<tap>`` and ``total``, for
    ``jax.value_and_grad(..., has_aux=True)``.
  """
  ce = cross_entropy(logits, labels, mask=mask, ignore_index=ignore_index, weight=weight)
  total = ce
  aux = {"ce": ce}
  for term in spec.terms if spec is not None else ():
    if term.name not in taps:
      raise ConfigError(
          f"isr.taps: tap {term.name!r} is not produced by the model; available: {sorted(taps)}"
      )
    z = taps[term.name]
    if term.mi_weight > 0:
      z_mi = scale_gradient(z, term.mi_weight) if spec.decouple_adapters else z
      q_logits = apply_adapter(adapter_params[term.name], z_mi, labels.shape[1:])
      mi = cross_entropy(q_logits, labels, mask=mask, ignore_index=ignore_index, weight=weight)
      aux[f"mi/{term.name}"] = mi
      aux[f"mi_accuracy/{term.name}"] = lax.stop_gradient(
          accuracy(q_logits, labels, mask=mask, ignore_index=ignore_index))
      if spec.decouple_adapters:
        # Value α·L_MI; gradient α·∇_z L_MI into the backbone (through scale_gradient)
        # and ∇_φ L_MI into the adapter: mi − sg(mi) is exactly 0 but carries weight 1.
        total = total + term.mi_weight * lax.stop_gradient(mi) + (mi - lax.stop_gradient(mi))
      else:
        total = total + term.mi_weight * mi
    if term.ne_weight > 0:
      ne = negative_entropy(z, mask=mask, normalize=spec.ne_normalize, weight=weight)
      aux[f"ne/{term.name}"] = ne
      total = total + term.ne_weight * ne
  aux["total"] = total
  return total, aux
