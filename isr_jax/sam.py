"""SAM-style weight perturbation as optax gradient transformations.

A sharpness-aware step takes the gradient of a loss *A* at ``w``, turns it into
a perturbation ``ε``, and applies the gradient of a loss *B* taken at ``w + ε``
at the *unperturbed* ``w`` through any base optimizer:

* SAM / FedSAM (Foret et al. 2021; Qu et al. 2022): A = B, ``ε = ρ g/‖g‖``;
* ASAM / FedASAM (Kwon et al. 2021; Caldarola et al. 2022): A = B,
  ``ε = ρ T² g / ‖T g‖`` with ``T = |w| + η``;
* FedSoL (Lee et al. 2024, FedSoL paper Eq. 4, 12): A = a proximal loss,
  B = the client's own objective, ``ε = ρ Λ ⊙ g_p/‖g_p‖`` with ``Λ`` all ones
  (fixed radius) or, per parameter tensor, ``|w_k − w_g| / ‖w_k − w_g‖₂``.

The perturbation is an optax chain (``g_A ↦ ε``), built by :func:`perturbation`
from the transforms below; :func:`perturbed_gradient` forms ``∇B(w + ε)``; and
:func:`sam_optimizer` wraps any base optimizer into an optax optimizer whose
``update`` takes ``g_A`` and a ``grad_fn`` for B.

Why not ``optax.contrib.sam``: in opaque mode with ``sync_period=2`` it computes
the same step (a test checks this for A = B), but its ``normalize`` divides by
``‖g‖`` with no guard — a gradient that is exactly zero must give ``ε = 0``, not
NaN — and its adversarial optimizer is re-initialised from the *current* weights
at every step, so it cannot hold the global anchor ``w_g`` that the adaptive
radius Λ needs. Here ``init`` of :func:`scale_by_discrepancy` stores the anchor,
and the normalisation is safe.

The normalisation cannot tell rounding noise from a direction: a gradient that
vanishes only mathematically (FedSoL's KL at ``w_k = w_g``, computed under jit
as ~1e-9 of noise) becomes a full ρ-sized ``ε``. Such zeros are known where
loss A is defined, and :mod:`isr_jax.fl.algorithms.fedsol` makes them exact before this
chain sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

SAM_EPS = 1e-12


def normalize_by_global_norm(eps: float = SAM_EPS) -> optax.GradientTransformation:
  """``g ↦ g / (‖g‖₂ + eps)``; a zero gradient stays zero (no NaN).

  The unit ascent direction of SAM (Foret et al. 2021; ``ε* = ρ ∇L/‖∇L‖₂`` as
  restated in FedSoL paper §2) and, between the two ``T``, of ASAM (Kwon et
  al. 2021). ``eps`` only guards ``0/0``; it is not a noise floor. For
  FedSAM/FedASAM (A = B) ``g`` is the client objective's own gradient: it is
  exactly zero only where the objective is flat in floating point (say, a batch
  without real examples; then ``ε = 0``), and any
  other ``g``, however small, is the direction the method prescribes — SAM's
  ``ε`` has norm ρ whatever ``‖g‖`` is, and a relative floor (``ε`` shrinking
  with ``‖g‖``) would be a different method. Common PyTorch SAM ports divide by
  ``‖g‖ + 1e-12`` too. Gradients that are zero by construction but not in floating
  point must be zeroed by whoever knows it (FedSoL's stationarity predicate).
  1e-12 is representable in float32 and bfloat16 (not float16).
  """

  def update_fn(updates, state, params=None):
    del params
    norm = otu.tree_norm(updates)
    return jax.tree.map(lambda g: g / (norm + eps), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class AnchorState(NamedTuple):
  anchor: Any


def scale_by_discrepancy(eps: float = SAM_EPS) -> optax.GradientTransformation:
  """FedSoL's adaptive radius Λ (FedSoL paper App. G, Eq. 11).

  ``init(params)`` records ``params`` as the anchor ``w_g`` (call it with the
  global model at the start of local training); ``update`` multiplies each
  parameter tensor's gradient by ``|w_k − w_g| / ‖w_k − w_g‖₂`` of that tensor
  (0 where the tensor has not moved). The authors' code normalises along axis 0
  of each tensor instead; we follow the paper's per-layer norm.
  """

  def init_fn(params):
    return AnchorState(anchor=params)

  def update_fn(updates, state, params):
    def scale(g, w, w_g):
      diff = jnp.abs(w - w_g)
      return g * diff / (jnp.linalg.norm(diff.ravel()) + eps)

    return jax.tree.map(scale, updates, params, state.anchor), state

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_param_magnitude(eta: float = 0.01) -> optax.GradientTransformation:
  """ASAM's ``T_w = |w| + η`` (elementwise), applied to the gradient."""

  def update_fn(updates, state, params):
    return jax.tree.map(lambda g, w: g * (jnp.abs(w) + eta), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def keep_only(mask: Any) -> optax.GradientTransformation:
  """Zeroes the updates where ``mask`` (a pytree of bools, or a callable of
  params returning one) is False — partial perturbation (FedSoL App. I)."""

  def update_fn(updates, state, params=None):
    m = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda g, keep: g if keep else jnp.zeros_like(g), updates, m), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def perturbation(
    rho: float,
    *,
    adaptive_radius: bool = False,
    asam_eta: float | None = None,
    mask: Any = None,
    eps: float = SAM_EPS,
) -> optax.GradientTransformation:
  """The chain ``g_A ↦ ε``: [keep_only] → [T·] → normalise → [T· | Λ⊙] → ×ρ.

  Args:
    rho: radius ρ ≥ 0 (0 gives ε = 0: the plain step).
    adaptive_radius: FedSoL's Λ; ``init`` must then receive the anchor ``w_g``.
    asam_eta: ASAM's η; ``None`` for SAM's isotropic ball.
    mask: which parameters to perturb (see :func:`keep_only`); ``None`` = all.
    eps: guard of the normalisation.
  """
  parts = []
  if mask is not None:
    parts.append(keep_only(mask))
  if asam_eta is not None:
    parts.append(scale_by_param_magnitude(asam_eta))
  parts.append(normalize_by_global_norm(eps))
  if asam_eta is not None:
    parts.append(scale_by_param_magnitude(asam_eta))
  if adaptive_radius:
    parts.append(scale_by_discrepancy(eps))
  parts.append(optax.scale(rho))
  return optax.chain(*parts)


def perturbed_gradient(
    perturb: optax.GradientTransformation,
    perturb_state: Any,
    params: Any,
    grad_a: Any,
    grad_b_fn: Callable[[Any], tuple[Any, Any]],
):
  """``∇B(w + ε)`` with ``ε = perturb(∇A(w))``: ``-> (grad_b, aux_b, ε)``."""
  eps, _ = perturb.update(grad_a, perturb_state, params)
  grad_b, aux = grad_b_fn(optax.apply_updates(params, eps))
  return grad_b, aux, eps


class SAMState(NamedTuple):
  base: Any
  perturb: Any


def sam_optimizer(base: optax.GradientTransformation,
                  perturb: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``base`` so that ``update(g_A, state, w, grad_fn=∇B)`` applies
  ``∇B(w + perturb(g_A))`` at ``w``. With A = B this is SAM around ``base``.

  ``init(params)`` also initialises the perturbation with ``params`` (the
  anchor of :func:`scale_by_discrepancy`).
  """

  def init_fn(params):
    return SAMState(base=base.init(params), perturb=perturb.init(params))

  def update_fn(updates, state, params=None, *, grad_fn, **extra):
    del extra
    grad_b, _, _ = perturbed_gradient(perturb, state.perturb, params, updates,
                                      lambda p: (grad_fn(p), None))
    new_updates, base_state = base.update(grad_b, state.base, params)
    return new_updates, SAMState(base=base_state, perturb=state.perturb)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
