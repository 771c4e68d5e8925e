"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020), Algorithm 1.

Control variates: the server's ``c`` and each client's ``c_i``, zero at the
start. A sampled client starting from ``x`` (the global model)

* steps with the corrected gradient ``g_i(y_i) + c − c_i``;
* sets ``c_i⁺ = c_i − c + (x − y_i)/(K η_l)`` (option II), ``K`` the
  local steps it actually took and ``η_l`` the round's local learning rate;
  with local SGD momentum ``β``, ``K`` becomes ``‖a‖₁`` of FedNova's
  heavy-ball weights (below);
* uploads ``(Δy_i, Δc_i) = (y_i − x, c_i⁺ − c_i)``.

The server moves ``x ← x + η_g · mean(Δy_i)`` and
``c ← c + (1/N) Σ_{i∈S} Δc_i`` with ``N`` all clients. ``η_g`` is the server
optimizer's learning rate (``fl.server_optimizer``, SGD at 1 by default); the
mean of ``Δy_i`` uses the round's ``|D_n|`` weights, as FedAvg does (the paper
averages uniformly over ``S``). The server sends ``x`` and ``c`` down, twice
FedAvg's downlink.

Assumptions where the paper is silent: option II's ``(x − y_i)/(K η_l)`` is
the mean corrected gradient only for local SGD, so any other client optimizer
(Adam, ...) is rejected by the config (:mod:`isr_jax.fl.registry`): an Adam
step is no fixed linear combination of the gradients, and ``c_i⁺`` would not be
a gradient at all. With heavy-ball momentum ``β`` the displacement is
``η_l Σ_k a_k g_k`` with ``‖a‖₁ = [K − β(1 − β^K)/(1 − β)] / (1 − β)``
(FedNova's ``a_i``, Wang et al. 2020), so dividing by ``‖a‖₁ η_l`` keeps ``c_i⁺``
an (``a``-weighted) mean gradient; dividing by ``K η_l`` instead overstates it up
to ``1/(1 − β)``-fold, and the control variates then diverge (measured: every
digits run with β = 0.9, lr 0.05). SGD's weight decay ``λ`` is L2 added to the
gradient before momentum (``isr_jax.optim``), so ``c_i⁺`` is the mean gradient of
``L_i + (λ/2)‖θ‖²``, the objective the clients actually descend; no correction
is needed. A client that took no step (``K = 0``) keeps its ``c_i``.

Local momentum and the correction (``momentum_correction``). The paper's step
adds ``c − c_i`` to the gradient; under heavy-ball momentum the constant
correction then accumulates to ``η (c − c_i)/(1 − β)`` per step, ten times the
plain-SGD displacement at β = 0.9, while ``c_i`` of a client with one or two
minibatches is a noisy estimate: on digits (lr 0.05, β = 0.9) every run
diverges. ``"scaled"`` (the default) feeds ``(1 − β)(c − c_i)`` to the
momentum instead, so its steady per-step displacement is ``η (c − c_i)``, as
with plain SGD and as NIID-Bench's SCAFFOLD (Li, Diao, Chen, He, ICDE 2022; it
applies ``η (c − c_i)`` after each momentum step) does up to a transient of
about ``1/(1 − β)`` steps. ``c_i⁺`` stays the ``a``-weighted mean gradient:
``c_i⁺ = (x − y_i)/(‖a‖₁ η_l) − (1 − β)(c − c_i)``. ``"full"`` is the
paper's step taken literally. With β = 0 the two are the same.

Personal ISR adapters (``isr.aggregate_adapters=False``, built with
``personal_adapters=True``) get no control variate: their ``c_i`` stays 0 and
so does the server's ``c`` for them (the round zeroes what never travels before
the server sees it), so their correction ``c − c_i`` is 0. There is no global
adapter for them to drift from; with ``c`` = 0 but ``c_i`` updated, option II
would instead subtract last round's mean adapter gradient on every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.config_checks import check_integer, check_local_sgd, check_one_of
from isr_jax.fl.algorithm import FLAlgorithm, loss_grad, weighted_sum
from isr_jax.fl.algorithms.shared import step_weight_sum


def init_server_state(params, data=None):
  del data
  return {"c": otu.tree_zeros_like(params)}


def init_client_state(params, client_data=None):
  del client_data
  return {"c": otu.tree_zeros_like(params)}


def client_init(broadcast, client_state, client_data):
  del client_data
  return {"correction": otu.tree_sub(broadcast.alg_state["c"], client_state["c"])}


MOMENTUM_CORRECTIONS = ("scaled", "full")


def make_client_grad(correction_weight: float):
  def client_grad(params, ctx, batch, problem, key):
    """The corrected local gradient ``g_i(y_i) + w (c − c_i)``, ``w`` = 1 or 1 − β."""
    del key
    grads, aux = loss_grad(params, batch, problem)
    return otu.tree_add_scale(grads, correction_weight, ctx["correction"]), aux

  return client_grad


def make_client_final(momentum: float = 0.0, nesterov: bool = False,
                      personal_adapters: bool = False, correction_weight: float = 1.0):
  """``client_final`` for local SGD with heavy-ball (or Nesterov) ``momentum``.

  ``personal_adapters``: the adapters' ``c_i`` is kept (0), see the module docstring.
  ``correction_weight``: the weight ``w`` of ``c − c_i`` in the local gradient.
  """

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """``c_i⁺`` (option II) and the message ``(Δy_i, Δc_i)``."""
    del ctx
    x, c, c_i = broadcast.params, broadcast.alg_state["c"], client_state["c"]
    took_steps = num_steps > 0
    steps = step_weight_sum(jnp.maximum(num_steps, 1), momentum, nesterov)
    scale = 1.0 / (steps * broadcast.local_lr)
    # (x − y)/(‖a‖₁η) = mean gradient + w (c − c_i): remove the correction's share.
    new_c_i = jax.tree.map(lambda ci, cs, a, b: correction_weight * (ci - cs) + scale * (a - b),
                           c_i, c, x, local_params)
    new_c_i = otu.tree_where(took_steps, new_c_i, c_i)
    if personal_adapters:
      new_c_i = {**new_c_i, "adapters": c_i["adapters"]}
    message = {"delta": otu.tree_sub(local_params, x), "delta_c": otu.tree_sub(new_c_i, c_i)}
    return message, {"c": new_c_i}

  return client_final


def downlink(broadcast):
  return {"params": broadcast.params, "c": broadcast.alg_state["c"]}


def scaffold(*, num_clients: int, momentum: float = 0.0, nesterov: bool = False,
             personal_adapters: bool = False, momentum_correction: str = "scaled") -> FLAlgorithm:
  """SCAFFOLD over ``num_clients`` clients (``N`` in the ``c`` update).

  ``momentum``, ``nesterov``: the clients' SGD momentum ``β`` (0 for plain SGD).
  ``momentum_correction``: ``"scaled"`` or ``"full"`` (module docstring).
  ``personal_adapters``: the ISR adapters stay on the clients
  (``isr.aggregate_adapters=False``) and get no control variate.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients={num_clients} must be >= 1")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum={momentum} must be in [0, 1)")
  if momentum_correction not in MOMENTUM_CORRECTIONS:
    raise ValueError(f"momentum_correction={momentum_correction!r} is not one of "
                     f"{MOMENTUM_CORRECTIONS}")
  weight = 1.0 - momentum if momentum_correction == "scaled" else 1.0

  def server_update(params, alg_state, messages, weights):
    """Pseudo-gradient ``−mean(Δy_i)``; ``c += (1/N) Σ_{i∈S} Δc_i``."""
    del params
    pseudo_grad = jax.tree.map(lambda d: -d, weighted_sum(messages["delta"], weights))
    real = (weights > 0).astype(jnp.float32)
    sum_dc = weighted_sum(messages["delta_c"], real)
    c = jax.tree.map(lambda c, s: c + s / num_clients, alg_state["c"], sum_dc)
    return pseudo_grad, {"c": c}

  return FLAlgorithm(
      name="scaffold", init_server_state=init_server_state, init_client_state=init_client_state,
      client_init=client_init, client_grad=make_client_grad(weight),
      client_final=make_client_final(momentum, nesterov, personal_adapters, weight),
      server_update=server_update, downlink=downlink)


# SCAFFOLD's option II follows the clients' SGD momentum ρ; other local
# optimizers are rejected. Under momentum the correction enters scaled by 1 − β,
# as NIID-Bench's SCAFFOLD applies it (module docstring; "full" diverges on
# digits:fl).
DEFAULTS = dict(momentum_correction="scaled")


def settings(config, name: str = "scaffold") -> dict:
  """:func:`scaffold`'s arguments from ``config.fl.<name>``, ``fl.num_clients``, the
  ISR adapters' placement and the clients' SGD."""
  return dict(
      num_clients=check_integer(config.fl.num_clients, "fl.num_clients"),
      personal_adapters=not config.isr.aggregate_adapters,
      momentum_correction=check_one_of(config.fl[name].momentum_correction,
                                       MOMENTUM_CORRECTIONS, f"fl.{name}.momentum_correction"),
      **check_local_sgd(config, name,
                        "its control variates c_i⁺ = c_i − c + (x − y_i)/(K η) are mean "
                        "gradients only under local SGD (Karimireddy et al. 2020, Eq. 4 "
                        "option II)"))
