"""FedAvgM (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", arXiv:1909.06335): FedAvg
with server momentum.

Clients are FedAvg's. The server accumulates the averaged update in a momentum
buffer and steps along it: ``v ← β v + Δ``, ``θ ← θ − η_s v``, with ``Δ`` the
FedAvg pseudo-gradient ``θ_t − Σ_n w_n θ_n``. That is ``optax.sgd(η_s,
momentum=β)`` fed the pseudo-gradient; it replaces ``fl.server_optimizer``.
``β = 0`` (with ``η_s = 1``) is FedAvg exactly.
"""

from __future__ import annotations

import optax

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg


def fedavgm(beta: float = 0.9, server_lr: float = 1.0) -> FLAlgorithm:
  """FedAvgM with server momentum ``beta`` ∈ [0, 1) and server learning rate ``server_lr``."""
  if not 0 <= beta < 1:
    raise ValueError(f"beta={beta} must be in [0, 1)")
  if server_lr <= 0:
    raise ValueError(f"server_lr={server_lr} must be > 0")
  return fedavg()._replace(name="fedavgm",
                           server_optimizer=optax.sgd(server_lr, momentum=beta))


# FedAvgM (Hsu, Qi, Brown, arXiv:1909.06335): server momentum β = 0.9 at server
# learning rate 1, as the FedAvgM of Reddi et al. 2021 (their
# google-research/federated optimization README); OmniISR Table VII runs 0.7, 0.9.
DEFAULTS = dict(beta=0.9, server_lr=1.0)


def settings(config, name: str = "fedavgm") -> dict:
  """:func:`fedavgm`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(beta=check_number(c.beta, f"fl.{name}.beta", low=0, high=1, high_open=True),
              server_lr=check_number(c.server_lr, f"fl.{name}.server_lr", low=0,
                                     low_open=True))
