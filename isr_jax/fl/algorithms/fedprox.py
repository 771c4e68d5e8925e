"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020).

Each client approximately minimises (Eq. 2 of the paper)

``h_k(w; w^t) = F_k(w) + (μ/2) ‖w − w^t‖²``

with ``F_k`` the client objective (here ``L_T``: cross-entropy plus the ISR
terms) and ``w^t`` the round's global model; the server averages as FedAvg
(Algorithm 2, with the ``|D_n|`` weights of the round). The proximal
term covers every trained parameter, the ISR adapters included. ``μ = 0`` is
FedAvg exactly. The term is also FedSoL's loss A when
``fl.fedsol.proximal="fedprox"`` (FedSoL paper App. H).

Not in the paper's equations: FedProx's tolerance to a variable amount of
local work (γ-inexact solutions) needs nothing here, since the engine already
runs whatever number of steps a client's data gives.
"""

from __future__ import annotations

import optax.tree_utils as otu

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import global_anchor, with_proximal_term


def fedprox_proximal_loss(mu: float):
  """``(μ/2) ‖w − w^t‖²`` as a proximal loss ``(params, anchor, ctx, batch, problem, key)``."""

  def loss(params, anchor, ctx, batch, problem, key):
    del ctx, batch, problem, key
    return 0.5 * mu * otu.tree_norm(otu.tree_sub(params, anchor), squared=True)

  return loss


def fedprox(mu: float = 0.01) -> FLAlgorithm:
  """FedProx with proximal weight ``mu`` (μ ≥ 0)."""
  if mu < 0:
    raise ValueError(f"mu={mu} must be >= 0")
  return fedavg()._replace(
      name="fedprox",
      client_init=global_anchor,
      client_grad=with_proximal_term(fedprox_proximal_loss(mu)),  # ∇F_k(w) + μ(w − w^t)
  )


# FedProx (Li et al., MLSys 2020): μ = 1, the paper's value for its image tasks
# (MNIST, FEMNIST; Fig. 1, the authors' plot_final_e20.py), picked from
# {0.001, 0.01, 0.1, 0.5, 1}; its README warns that no μ suits every setting.
# FedSoL (FedSoL paper, App. C) also picks μ = 1 from {0.1, 0.5, 1, 2}.
DEFAULTS = dict(mu=1.0)


def settings(config, name: str = "fedprox") -> dict:
  """:func:`fedprox`'s arguments from ``config.fl.<name>``."""
  return dict(mu=check_number(config.fl[name].mu, f"fl.{name}.mu", low=0))
