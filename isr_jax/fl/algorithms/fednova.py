"""FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020): normalized averaging.

A client that ran ``τ_i`` local steps moved by ``θ_t − θ_i = η G_i a_i``, with
``a_i`` the weights its local optimizer gave the ``τ_i`` gradients. FedNova
uploads the normalized update ``d_i = (θ_t − θ_i)/‖a_i‖₁`` and the server moves
by ``τ_eff Σ_i p_i d_i`` with ``τ_eff = Σ_i p_i ‖a_i‖₁`` (the paper's generalized
update rule with FedNova's weights ``w_i = p_i``), so clients that took more
steps no longer pull the average towards their own optimum.

``‖a_i‖₁`` for the local optimizers as derived in the paper, ``ρ`` the local
SGD momentum:

* plain SGD: ``τ_i``;
* heavy-ball momentum: ``(τ_i − ρ(1 − ρ^{τ_i})/(1 − ρ))/(1 − ρ)``;
* Nesterov momentum (not in the paper; the same sum for optax's Nesterov
  update ``g + ρ v``): ``τ_i + ρ ‖a_i‖₁^{heavy-ball}``.

``p_i`` are the round's ``|D_n|`` weights. With equal ``τ_i`` the update is
FedAvg's (up to rounding). Assumptions: SGD's weight decay is L2 added to the
gradient before momentum (``isr_jax.optim``), so it is part of ``G_i`` and does
not change ``a_i``; local optimizers other than SGD (Adam, ...) have no such
``a_i`` (their step is no fixed linear combination of the gradients) and are
rejected by the config (:mod:`isr_jax.fl.registry`); a client that took no step
has ``a_i = 0`` and contributes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.config_checks import check_local_sgd
from isr_jax.fl.algorithm import FLAlgorithm, weighted_sum
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import step_weight_sum


def fednova(momentum: float = 0.0, *, nesterov: bool = False) -> FLAlgorithm:
  """FedNova for clients running SGD with ``momentum`` ρ ∈ [0, 1)."""
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum={momentum} must be in [0, 1)")

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads ``d_i = (θ_t − θ_i)/‖a_i‖₁`` and ``‖a_i‖₁``."""
    del ctx
    a = step_weight_sum(num_steps, momentum, nesterov)
    inv = jnp.where(a > 0, 1.0 / jnp.where(a > 0, a, 1.0), 0.0)
    d = jax.tree.map(lambda x, y: (x - y) * inv, broadcast.params, local_params)
    return {"d": d, "a": a}, client_state

  def server_update(params, alg_state, messages, weights):
    """``τ_eff Σ p_i d_i`` with ``τ_eff = Σ p_i ‖a_i‖₁``, logged as ``server/tau_eff``
    (how far the normalized updates are extrapolated: a client that ran one step
    is applied with ``τ_eff`` times FedAvg's weight)."""
    del params
    tau_eff = jnp.sum(weights * messages["a"])
    return (otu.tree_scale(tau_eff, weighted_sum(messages["d"], weights)), alg_state,
            {"tau_eff": tau_eff})

  return fedavg()._replace(
      name="fednova", client_final=client_final, server_update=server_update, mean_messages=False)


def settings(config, name: str = "fednova") -> dict:
  """:func:`fednova`'s arguments: the clients' SGD momentum (no setting of its own)."""
  return check_local_sgd(config, name, "its normalizer ‖a_i‖₁ is the sum of local "
                         "SGD(-momentum) step weights (Wang et al. 2020)")
