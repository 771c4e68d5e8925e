"""FedNTD (Lee, Jeong, Shin, Bae, Yun, NeurIPS 2022): not-true distillation.

"Preservation of the Global Knowledge by Not-True Distillation in Federated
Learning". Each client minimises

``L = L_CE(q_l, y) + β · L_NTD``,
``L_NTD = KL(q̃_g^τ ‖ q̃_l^τ) = −Σ_{c≠y} q̃_g^τ(c) log(q̃_l^τ(c) / q̃_g^τ(c))``,

where ``q̃^τ(c) = exp(z_c/τ) / Σ_{c'≠y} exp(z_c'/τ)`` is the softened softmax
over the *not-true* classes only: the true class's logit is removed from both
the local logits ``z_l`` and the round's global-model logits ``z_g`` (no
gradient flows into ``z_g``). ``L_CE`` is the client objective ``L_T`` (CE plus
the ISR terms, on the same forward pass). The server averages as FedAvg.

Scaling and defaults follow the authors' code (Lee-Gihun/FedNTD,
``algorithms/fedntd/criterion.py`` and ``config/fedntd.json``): KL summed over
the not-true classes and averaged over the examples, no ``τ²`` factor,
``β = 1``, ``τ = 1`` (the values FedSoL's Table 4 also uses).

Dense outputs (``[B, H, W, K]`` logits, ``[B, H, W]`` labels) are handled per
pixel and averaged over the valid pixels, like the CE of :mod:`isr_jax.losses`.
Assumed (the paper is classification only): a position whose label is outside
``[0, K)`` — the segmentation ignore label 255 — has no true class and is left
out of the mean. The removal of the true class is a mask, not a ``−inf`` logit,
so no ``0 · log 0`` or ``inf − inf`` can occur; ``β = 0`` is FedAvg exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.fl.algorithm import FLAlgorithm, grad_with_terms, no_state
from isr_jax.fl.fedavg import client_final, server_update


def restricted_log_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """``log softmax`` over the classes where ``keep`` (last axis); 0 elsewhere.

  Finite everywhere and in every gradient, also when ``keep`` is all False
  (then it is 0): the left-out classes never enter an ``exp`` or a ``log``.
  """
  any_keep = jnp.any(keep, axis=-1, keepdims=True)
  top = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(any_keep, top, 0.0))
  shifted = jnp.where(keep, logits - top, 0.0)
  total = jnp.sum(jnp.where(keep, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  return jnp.where(keep, shifted - jnp.log(jnp.where(any_keep, total, 1.0)), 0.0)


def restricted_kl(student: jax.Array, teacher: jax.Array, keep: jax.Array,
                  tau: float) -> jax.Array:
  """``KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` over the classes where ``keep``, per position.

  The teacher logits get no gradient; 0 where no class is kept.
  """
  log_p_s = restricted_log_softmax(student / tau, keep)
  log_p_t = restricted_log_softmax(jax.lax.stop_gradient(teacher) / tau, keep)
  return jnp.sum(jnp.where(keep, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)


def position_mean(values: jax.Array, valid: jax.Array, mask: jax.Array,
                  weight: jax.Array | None = None) -> jax.Array:
  """``Σ w·v / #valid`` over positions ``[B, ...]`` that are ``valid`` and whose example is real.

  Normalised like :mod:`isr_jax.losses`: importance weights scale the terms,
  not the count (FedIR); 0 when nothing is valid.
  """
  expand = lambda a: a.reshape(a.shape + (1,) * (values.ndim - 1))
  valid = valid & expand(mask)
  if weight is not None:
    values = values * expand(weight)
  count = jnp.sum(valid.astype(values.dtype))
  return jnp.sum(jnp.where(valid, values, 0.0)) / jnp.maximum(count, 1.0)


def not_true_kl(local_logits: jax.Array, global_logits: jax.Array, labels: jax.Array,
                tau: float) -> tuple[jax.Array, jax.Array]:
  """Per-position ``L_NTD`` and which positions have a true class in ``[0, K)``."""
  k = local_logits.shape[-1]
  has_label = (labels >= 0) & (labels < k)
  keep = jnp.arange(k) != labels[..., None]
  return restricted_kl(local_logits, global_logits, keep, tau), has_label


def ntd_loss(local_logits, global_logits, labels, *, tau: float, mask,
             weight=None) -> jax.Array:
  """``L_NTD`` averaged over the valid positions of a batch (logits ``[B, ..., K]``)."""
  kl, has_label = not_true_kl(local_logits, global_logits, labels, tau)
  return position_mean(kl, has_label, mask, weight)


def client_init(broadcast, client_state, client_data):
  del client_state, client_data
  return {"global": broadcast.params}


def fedntd(beta: float = 1.0, tau: float = 1.0) -> FLAlgorithm:
  """FedNTD with distillation weight ``beta`` (β ≥ 0) and temperature ``tau`` (τ > 0)."""
  if beta < 0:
    raise ValueError(f"beta={beta} must be >= 0")
  if tau <= 0:
    raise ValueError(f"tau={tau} must be > 0")

  def client_grad(params, ctx, batch, problem, key):
    """``∇(L_T + β L_NTD)`` with one forward pass of the local model."""
    del key
    z_g, _ = problem.apply(jax.lax.stop_gradient(ctx["global"]["model"]), batch.x)
    return grad_with_terms(params, batch, problem, lambda p, logits, taps: {
        "ntd": (beta, ntd_loss(logits, z_g, batch.y, tau=tau, mask=batch.mask,
                               weight=batch.weight))})

  return FLAlgorithm(
      name="fedntd",
      init_server_state=no_state,
      init_client_state=no_state,
      client_init=client_init,
      client_grad=client_grad,
      client_final=client_final,
      server_update=server_update,
  )
