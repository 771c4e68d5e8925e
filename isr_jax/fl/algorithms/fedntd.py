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

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm, grad_with_terms
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import global_anchor, position_mean, restricted_kl


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

  return fedavg()._replace(
      name="fedntd", client_init=global_anchor, client_grad=client_grad)


# FedNTD (Lee et al., NeurIPS 2022): β = 1, τ = 1, the authors' code
# (Lee-Gihun/FedNTD config/fedntd.json) and FedSoL's pick from β ∈ {0.5, 1},
# τ ∈ {1, 3} (FedSoL paper, App. C).
DEFAULTS = dict(beta=1.0, tau=1.0)


def settings(config, name: str = "fedntd") -> dict:
  """:func:`fedntd`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(beta=check_number(c.beta, f"fl.{name}.beta", low=0),
              tau=check_number(c.tau, f"fl.{name}.tau", low=0, low_open=True))
