"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020).

Each client approximately minimises (Eq. 2 of the paper)

``h_k(w; w^t) = F_k(w) + (μ/2) ‖w − w^t‖²``

with ``F_k`` the client objective (here ``L_T``: cross-entropy plus the ISR
terms) and ``w^t`` the round's global model; the server averages as FedAvg
(Algorithm 2, with the ``|D_n|`` weights of the round). The proximal
term covers every trained parameter, the ISR adapters included. ``μ = 0`` is
FedAvg exactly. The term is also FedSoL's loss A when
``fl.fedsol.proximal="fedprox"`` (FedSoL paper App. H).

**The local solver is proximal SGD.** Each local step is the engine's optimizer
step on ``∇F_k`` followed by the proximal operator of ``(μ/2)‖w − w^t‖²`` with
step ``η`` (:func:`proximal_step`): ``w ← (w + ημ w^t) / (1 + ημ)``. The paper
allows any local solver of ``h_k`` (its γ-inexact solutions); this one differs
from SGD on ``∇h_k`` by ``O((ημ)²)`` per step without momentum, and it keeps
the pull out of the momentum buffer. Fed through heavy-ball momentum (β = 0.9)
the gradient ``μ(w − w^t)`` makes an under-damped oscillator of period
``≈ 2π/√(ημ/(1 − β))`` steps (28 at η = 0.05, μ = 1) whose swings carry the
weights past the anchor into regions where the cross-entropy is sharp: on
Fashion-MNIST Dir(0.1), 20 clients, the largest client's local epoch diverged
after ~90 steps at μ = 1 and ~280 at μ = 0.3; with the proximal step the
same run trains (methods §FedProx).

Not in the paper's equations: FedProx's tolerance to a variable amount of
local work (γ-inexact solutions) needs nothing here, since the engine already
runs whatever number of steps a client's data gives.
"""

from __future__ import annotations

import jax
import optax.tree_utils as otu

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm, loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg


def fedprox_proximal_loss(mu: float):
  """``(μ/2) ‖w − w^t‖²`` as a proximal loss ``(params, anchor, ctx, batch, problem, key)``."""

  def loss(params, anchor, ctx, batch, problem, key):
    del ctx, batch, problem, key
    return 0.5 * mu * otu.tree_norm(otu.tree_sub(params, anchor), squared=True)

  return loss


def proximal_step(params, anchor, lr, mu: float):
  """``prox_{ημ/2 ‖· − w^t‖²}(w) = (w + ημ w^t) / (1 + ημ)``: the proximal operator of
  FedProx's term with step ``η = lr``, exact for any ``ημ`` (an implicit step, so
  no ``μ`` makes it overshoot the anchor)."""
  pull = lr * mu
  return jax.tree.map(lambda w, a: ((w + pull * a) / (1.0 + pull)).astype(w.dtype),
                      params, anchor)


def fedprox(mu: float = 0.01) -> FLAlgorithm:
  """FedProx with proximal weight ``mu`` (μ ≥ 0), solved locally by proximal SGD."""
  if mu < 0:
    raise ValueError(f"mu={mu} must be >= 0")
  prox_value = fedprox_proximal_loss(mu)

  def client_init(broadcast, client_state, client_data):
    del client_state, client_data
    return {"global": broadcast.params, "lr": broadcast.local_lr}

  def local_update(start, ctx, trainer):
    """Optimizer steps on ``∇F_k``, each followed by :func:`proximal_step`; the term's
    value is reported as ``prox`` (and included in ``total``)."""

    def grad_fn(params, batch, key):
      grads, aux = loss_grad(params, batch, trainer.problem)
      prox = prox_value(params, ctx["global"], ctx, batch, trainer.problem, key)
      return grads, {**aux, "prox": prox, "total": aux["total"] + prox}

    params, aux_sum, num_steps = trainer.train(
        start, grad_fn, project=lambda p: proximal_step(p, ctx["global"], ctx["lr"], mu))
    return params, ctx, aux_sum, num_steps

  return fedavg()._replace(name="fedprox", client_init=client_init, local_update=local_update)


# FedProx (Li et al., MLSys 2020): μ = 1, the paper's value for its image tasks
# (MNIST, FEMNIST; Fig. 1, the authors' plot_final_e20.py), picked from
# {0.001, 0.01, 0.1, 0.5, 1}; its README warns that no μ suits every setting.
# FedSoL (FedSoL paper, App. C) also picks μ = 1 from {0.1, 0.5, 1, 2}.
DEFAULTS = dict(mu=1.0)


def settings(config, name: str = "fedprox") -> dict:
  """:func:`fedprox`'s arguments from ``config.fl.<name>``."""
  return dict(mu=check_number(config.fl[name].mu, f"fl.{name}.mu", low=0))
