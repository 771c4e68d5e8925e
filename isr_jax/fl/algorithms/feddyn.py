"""FedDyn (Acar, Zhao, Navarro, Mattina, Whatmough, Saligrama, ICLR 2021), Algorithm 1.

Per client ``i`` the state is ``∇L_i(θ_i^{t−1})`` (zero at the start). In round
``t`` a sampled client

* minimises ``L_T(θ) − ⟨∇L_i(θ_i^{t−1}), θ⟩ + (α/2) ‖θ − θ^{t−1}‖²``,
  i.e. its local gradient is ``∇L_T(θ) − ∇L_i(θ_i^{t−1}) + α (θ − θ^{t−1})``;
* sets ``∇L_i(θ_i^t) = ∇L_i(θ_i^{t−1}) − α (θ_i^t − θ^{t−1})`` (the
  first-order condition of that minimisation) and uploads ``θ_i^t − θ^{t−1}``.

The server keeps ``h``:
``h^t = h^{t−1} − α (1/N) Σ_{i∈P_t} (θ_i^t − θ^{t−1})`` with ``N`` all clients,
and ``θ^t = avg_{i∈P_t} θ_i^t − (1/α) h^t``.

Weighting (our choice, the paper averages uniformly over ``P_t``): the average
of the sampled ``θ_i^t`` uses the round's ``|D_n|`` weights, as FedAvg does, so
that ``α = 0`` is FedAvg exactly (``h`` stays 0 and the ``1/α`` term is skipped
by a static branch). The ``h`` update keeps the paper's unweighted sum over the
sampled clients divided by ``N``; padding rows (weight 0) are left out of it.

The two extra terms are also FedSoL's loss A when ``fl.fedsol.proximal="feddyn"``
(FedSoL paper App. H); they read the client's ``∇L_i(θ_i^{t−1})`` from
FedDyn's own context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.config_checks import check_integer, check_number
from isr_jax.fl.algorithm import FLAlgorithm, weighted_sum
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.shared import with_proximal_term


def feddyn_proximal_loss(alpha: float):
  """``−⟨∇L_i(θ_i^{t−1}), θ⟩ + (α/2) ‖θ − θ^{t−1}‖²`` as a proximal loss.

  ``anchor`` is ``θ^{t−1}``; ``ctx["prev_grad"]`` is the client's ``∇L_i(θ_i^{t−1})``.
  """

  def loss(params, anchor, ctx, batch, problem, key):
    del batch, problem, key
    linear = otu.tree_vdot(ctx["prev_grad"], params)
    return 0.5 * alpha * otu.tree_norm(otu.tree_sub(params, anchor), squared=True) - linear

  return loss


def init_server_state(params, data=None):
  """``h^0 = 0``."""
  del data
  return {"h": otu.tree_zeros_like(params)}


def init_client_state(params, client_data=None):
  """``∇L_i(θ_i^0) = 0``."""
  del client_data
  return {"prev_grad": otu.tree_zeros_like(params)}


def client_init(broadcast, client_state, client_data):
  del client_data
  return {"global": broadcast.params, "prev_grad": client_state["prev_grad"]}


def feddyn(alpha: float = 0.01, *, num_clients: int) -> FLAlgorithm:
  """FedDyn with regularisation weight ``alpha`` (α ≥ 0) over ``num_clients`` clients."""
  if alpha < 0:
    raise ValueError(f"alpha={alpha} must be >= 0")
  if num_clients < 1:
    raise ValueError(f"num_clients={num_clients} must be >= 1")

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """``∇L_i(θ_i^t) = ∇L_i(θ_i^{t−1}) − α (θ_i^t − θ^{t−1})``."""
    message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    new_grad = jax.tree.map(lambda g, d: g - alpha * d, client_state["prev_grad"],
                            message["delta"])
    return message, {"prev_grad": new_grad}

  def server_update(params, alg_state, messages, weights):
    """The server step as the pseudo-gradient ``θ^{t−1} − θ^t = −Σ w_i Δ_i + h^t/α``."""
    del params
    pseudo_grad = jax.tree.map(lambda d: -d, weighted_sum(messages["delta"], weights))
    if alpha == 0:
      return pseudo_grad, alg_state
    real = (weights > 0).astype(jnp.float32)
    h = jax.tree.map(lambda h, s: h - (alpha / num_clients) * s,
                     alg_state["h"], weighted_sum(messages["delta"], real))
    pseudo_grad = jax.tree.map(lambda g, h: g + h / alpha, pseudo_grad, h)
    return pseudo_grad, {"h": h}

  return FLAlgorithm(
      name="feddyn",
      init_server_state=init_server_state,
      init_client_state=init_client_state,
      client_init=client_init,
      # ∇L_T(θ) − ∇L_i(θ_i^{t−1}) + α (θ − θ^{t−1})
      client_grad=with_proximal_term(feddyn_proximal_loss(alpha)),
      client_final=client_final,
      server_update=server_update,
  )


# FedDyn (Acar et al., ICLR 2021): α = 0.01, the authors' CIFAR-10 example
# (alpemreacar/FedDyn, example_cifar_10.py, alpha_coef = 1e-2); OmniISR Table VII
# runs 0.005 and 0.01.
DEFAULTS = dict(alpha=0.01)


def settings(config, name: str = "feddyn") -> dict:
  """:func:`feddyn`'s arguments from ``config.fl.<name>`` and ``fl.num_clients``."""
  return dict(alpha=check_number(config.fl[name].alpha, f"fl.{name}.alpha", low=0),
              num_clients=check_integer(config.fl.num_clients, "fl.num_clients"))
