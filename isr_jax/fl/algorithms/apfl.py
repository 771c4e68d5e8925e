"""APFL (Deng, Kamani, Mahdavi 2020, "Adaptive Personalized Federated Learning",
arXiv:2003.13461, Algorithm 1).

Each client ``i`` keeps a personal model ``v_i`` and a mixing weight
``α_i ∈ [0, 1]``; its personalized model is the mixture
``v̄_i = α_i v_i + (1 − α_i) w``. In every local step on a batch ``ξ``:

* the global model takes FedAvg's step, ``w ← w − η ∇f_i(w; ξ)``;
* the personal model steps on the mixture's loss, ``v_i ← v_i − η ∇_v f_i(v̄_i; ξ)
  = v_i − η α_i ∇f_i(v̄_i; ξ)`` (``w`` held fixed in it);
* the mixing weight steps on the same loss, ``α_i ← Π_[0,1](α_i − η ⟨v_i − w,
  ∇f_i(v̄_i; ξ)⟩)`` (the paper's Eq. for ``∇_α``, projected back to [0, 1] after
  the step — the engine's ``project`` hook).

The server averages the global models as FedAvg; ``v_i`` and ``α_i`` never travel.
The personalized model evaluated on client ``i``'s own test split is ``v̄_i``
with the current global model.

In this library ``f_i`` is the client objective ``L_T`` (ISR terms included)
and ``w``, ``v_i`` are whole ``{"model", "adapters"}`` trees. The three updates
are one step of the engine's local optimizer on the tree ``{w, v, α}``, so
momentum and weight decay act on all three (the paper's plain SGD has neither;
at weight decay λ the pull on α is η λ α per step, 5e-6 at the presets).
Choices where the paper leaves room: ``v_i`` starts as the initial global model
(PFLlib, FL-bench), and ``α_i`` at ``personal_weight``; with ``adaptive`` off α
stays there (the paper's fixed-α APFL), frozen also against weight decay.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_flag, check_number
from isr_jax.fl.algorithm import FLAlgorithm, LocalProblem, loss_grad
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg


def mixture(weight: jax.Array, personal, global_params):
  """``v̄ = α v + (1 − α) w`` leaf by leaf."""
  return jax.tree.map(lambda v, w: weight * v + (1.0 - weight) * w, personal, global_params)


def apfl_grads(joint, batch, problem: LocalProblem):
  """The gradients of one APFL step at ``joint = {"w", "v", "weight"}`` (module docstring).

  Returns ``(grads, aux)``: ``grads["w"] = ∇f(w)``, ``grads["v"] = α ∇f(v̄)``,
  ``grads["weight"] = ⟨v − w, ∇f(v̄)⟩``; ``aux`` is the global model's loss terms.
  """
  g_w, aux = loss_grad(joint["w"], batch, problem)
  w = jax.lax.stop_gradient(joint["w"])

  def personal_loss(v, weight):
    return problem.loss(mixture(weight, v, w), batch)[0]

  g_v, g_weight = jax.grad(personal_loss, argnums=(0, 1))(joint["v"], joint["weight"])
  return {"w": g_w, "v": g_v, "weight": g_weight}, aux


def _project(joint):
  return {**joint, "weight": jnp.clip(joint["weight"], 0.0, 1.0)}


def apfl(personal_weight: float = 0.5, adaptive: bool = True) -> FLAlgorithm:
  """APFL with initial mixing weight ``personal_weight`` ∈ [0, 1], learned when ``adaptive``."""
  if not 0 <= personal_weight <= 1:
    raise ValueError(f"personal_weight={personal_weight} must be in [0, 1]")

  def init_client_state(params, client_data=None):
    del client_data
    return {"v": params, "weight": jnp.asarray(personal_weight, jnp.float32)}

  def client_init(broadcast, client_state, client_data):
    del broadcast, client_data
    return dict(client_state)

  def local_update(start, ctx, trainer):
    """Algorithm 1's local steps on ``{w, v, α}`` from ``w^t`` and the client's ``v``, ``α``."""
    joint = {"w": start, "v": ctx["v"], "weight": ctx["weight"]}
    trainable = None if adaptive else (lambda path: path[0].key != "weight")
    joint, aux_sum, num_steps = trainer.train(
        joint, lambda p, b, k: apfl_grads(p, b, trainer.problem), trainable=trainable,
        project=_project)
    return joint["w"], {"v": joint["v"], "weight": joint["weight"]}, aux_sum, num_steps

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads ``w_i − w^t`` (FedAvg) and keeps ``v_i``, ``α_i``."""
    message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    return message, {"v": ctx["v"], "weight": ctx["weight"]}

  def eval_model(params, client_state, trainer):
    """Client ``i``'s personalized model ``v̄_i = α_i v_i + (1 − α_i) w``."""
    mixed = mixture(client_state["weight"], client_state["v"], params)
    return lambda x: trainer.problem.apply(mixed["model"], x)[0]

  return fedavg()._replace(
      name="apfl", init_client_state=init_client_state, client_init=client_init,
      client_final=client_final, local_update=local_update, eval_model=eval_model)


# α_0 = 0.5, the equal mixture (our choice; the paper learns α from its
# initial value and also reports fixed-α runs), learned by default (the "A" of
# APFL).
DEFAULTS = dict(personal_weight=0.5, adaptive=True)


def settings(config, name: str = "apfl") -> dict:
  """:func:`apfl`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(personal_weight=check_number(c.personal_weight, f"fl.{name}.personal_weight",
                                           low=0, high=1),
              adaptive=check_flag(c.adaptive, f"fl.{name}.adaptive"))
