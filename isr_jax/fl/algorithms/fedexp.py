"""FedExP (Jhunjhunwala, Wang, Joshi, ICLR 2023): FedAvg with an adaptive server step.

Clients are FedAvg's. The server extrapolates along the averaged update with a
step size set each round from the clients' own updates (the paper's Eq. 9, a
projection-onto-convex-sets argument):

``η_g = max(1, Σ_n w_n ‖Δ_n‖² / (2 (‖Δ̄‖² + S ε)))``,  ``Δ̄ = Σ_n w_n Δ_n``,

with ``Δ_n = θ_n − θ_t`` each sampled client's update, ``w_n`` the round's
weights and ``S`` the number of sampled clients; the pseudo-gradient is
``−η_g Δ̄``. When the clients agree (all ``Δ_n`` equal) ``η_g = 1``: FedAvg; the
more their updates cancel in the mean, the longer the step. ε keeps the step
bounded as ``Δ̄ → 0``; it enters multiplied by ``S`` as in the authors' code
(Divyansh03/FedExP main.py), whose weighted form this is. ``η_g`` is reported
every round as ``server/eta_g``.

Not reproduced from the authors' code: ε decays there by the square of the local
learning-rate decay each round (here it is fixed; set ``client_optimizer``'s
decay to 1 to match both), and their evaluation reads the mean of the last two
iterates, which oscillate; here the round's iterate is evaluated, as for every
algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm, weighted_sum
from isr_jax.fl.algorithms.fedavg import fedavg


def server_step_size(deltas, weights: jax.Array, epsilon: float, mean=None) -> jax.Array:
  """``η_g`` of the module docstring for client updates ``deltas`` stacked on axis 0
  (``mean``: their weighted mean ``Δ̄`` when the caller has it)."""
  mean = weighted_sum(deltas, weights) if mean is None else mean
  squared = jax.vmap(lambda d: otu.tree_norm(d, squared=True))(deltas)
  sampled = jnp.sum(weights > 0).astype(jnp.float32)
  ratio = jnp.sum(weights * squared) / (
      2.0 * (otu.tree_norm(mean, squared=True) + sampled * epsilon))
  return jnp.maximum(1.0, ratio)


def fedexp(epsilon: float = 1e-3) -> FLAlgorithm:
  """FedExP with the step's regularizer ``epsilon`` > 0."""
  if not epsilon > 0:
    raise ValueError(f"epsilon={epsilon} must be > 0")

  def server_update(params, alg_state, messages, weights):
    del params
    mean = weighted_sum(messages["delta"], weights)
    eta = server_step_size(messages["delta"], weights, epsilon, mean)
    pseudo_grad = jax.tree.map(lambda d: -eta.astype(d.dtype) * d, mean)
    return pseudo_grad, alg_state, {"eta_g": eta}

  # Every client's own update is read (‖Δ_n‖²), not only their mean.
  return fedavg()._replace(name="fedexp", server_update=server_update, mean_messages=False)


# ε = 1e-3: the authors' value for CIFAR-10, CIFAR-100 and CINIC-10 (main.py;
# 0.1 for EMNIST), the paper's image experiments.
DEFAULTS = dict(epsilon=1e-3)


def settings(config, name: str = "fedexp") -> dict:
  """:func:`fedexp`'s arguments from ``config.fl.<name>``."""
  return dict(epsilon=check_number(config.fl[name].epsilon, f"fl.{name}.epsilon", low=0,
                                   low_open=True))
