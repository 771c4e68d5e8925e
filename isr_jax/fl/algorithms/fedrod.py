"""FedRoD (Chen & Chao, ICLR 2022): federated robust decoupling of a generic and a
personalized predictor.

"On Bridging Generic and Personalized Federated Learning for Image
Classification". The model is a body ``f(·; θ)`` giving features ``z`` and a
*generic* head ``h_G(z; ψ)``, both shared and averaged by the server, plus a
*personalized* head ``h_P(z; φ_k)`` kept on each client. Two losses:

* the generic model ``(θ, ψ)`` minimises the client's *balanced* risk, here the
  balanced softmax (BSM, Ren et al., NeurIPS 2020, FedRoD's choice of loss):
  cross-entropy of ``h_G(z) + log n_{k,c}`` with ``n_{k,c}`` client ``k``'s
  count of class ``c``, an objective whose minimiser does not follow the
  client's label skew, so clients agree on it;
* the personalized head minimises the client's empirical risk (plain CE) of
  the *sum* ``h_G(z) + h_P(z)`` — a residual on top of the generic predictor —
  with ``z`` and ``h_G(z)`` held fixed: its gradient reaches ``φ_k`` only,
  never the body or the generic head.

The personalized model of client ``k`` predicts ``h_G(z) + h_P(z; φ_k)`` with the
global body and generic head; the server sees only ``(θ, ψ)``.

In this library the generic objective is the client objective ``L_T`` with BSM
in place of CE (the ISR terms act on the taps, unchanged), and ``φ_k`` has the
shape of the model's head ``params["model"]["head"]``.

Choices where the paper leaves room:

* Schedule and ``E_p``. A sampled client first trains ``(θ, ψ)`` on BSM for the
  round's epochs (one run of the engine's local optimizer), then ``φ_k`` alone
  for ``E_p`` epochs (FedAIMS §5.1: ``E_p = 5``) on the features of its
  trained local body, with its own shuffle (``stream=1``). The paper and the
  reference implementations (PFLlib, FL-bench) interleave the two updates on
  each mini-batch instead, so there ``E_p`` is the round's ``E``; FedAIMS runs
  ``E = E_p = 5``, where both schedules make the same number of head steps.
  What flows where is the paper's either way.
* ``φ_k`` starts as a copy of the initial global head (as PFLlib and FL-bench
  initialise it), so the personalized logits start at twice the generic ones.
* ``log n_{k,c}`` enters as ``log(n_{k,c} / max_c n_{k,c})``: BSM does not change
  under a shift shared by all classes, and uniform counts then add exactly 0,
  so BSM *is* CE, bit for bit. A class the client lacks gets a log-prior of
  ``-1e9`` (``log 0``, finite so no masked padding example yields ∞): it never
  occurs in the client's labels and gets softmax mass 0.
* The two heads are added through their parameters:
  ``h_G(z; ψ) + h_P(z; φ) = h(z; ψ + φ)`` because every model's head is affine
  in its parameters (a Dense layer, or a 1×1 convolution followed by a linear
  resize for the segmentation models), so the personalized model costs one
  forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_integer
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import label_counts

LOG_ABSENT = -1e9  # log-prior of a class the client does not have (log 0)


def balanced_logits(logits: jax.Array, counts: jax.Array) -> jax.Array:
  """``logits + log(n_c / max n)`` over the last (class) axis: the BSM input."""
  present = counts > 0
  ratio = jnp.where(present, counts, 1.0) / jnp.maximum(jnp.max(counts), 1.0)
  prior = jnp.where(present, jnp.log(ratio), LOG_ABSENT)
  return logits + prior.astype(logits.dtype)


def with_head(model, head):
  """The model tree with its head's parameters replaced by ``head``."""
  return {**model, "head": head}


def summed_head(model, personal_head):
  """The model predicting ``h_G(z) + h_P(z)``: its head's parameters plus ``φ``."""
  return with_head(model, jax.tree.map(jnp.add, model["head"], personal_head))


def _head(params):
  if "head" not in params["model"]:
    raise ConfigError("fl.algorithm='fedrod' needs a model whose classifier is "
                      f"params['model']['head']; this one has {sorted(params['model'])}")
  return params["model"]["head"]


def init_client_state(params, client_data=None):
  """``φ_k`` starts as a copy of the initial global head."""
  del client_data
  return {"head": _head(params)}


def client_init(broadcast, client_state, client_data):
  """Client ``k``'s class counts ``n_{k,c}`` over its training data, and its ``φ_k``."""
  del broadcast
  num_classes = client_state["head"]["kernel"].shape[-1]
  return {"counts": label_counts(client_data.y, client_data.mask, num_classes),
          "head": client_state["head"]}


def balanced_grad(params, ctx, batch, problem):
  """``∇_{θ,ψ} L_T`` with BSM (``ctx["counts"]``) in place of CE."""

  def loss(p):
    logits, taps = problem.apply(p["model"], batch.x)
    return problem.objective(balanced_logits(logits, ctx["counts"]), taps, p["adapters"], batch)

  (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return grads, aux


def fedrod(personal_epochs: int = 5) -> FLAlgorithm:
  """FedRoD with ``personal_epochs`` (E_p ≥ 1) of personalized-head training per round."""
  if int(personal_epochs) != personal_epochs or personal_epochs < 1:
    raise ValueError(f"personal_epochs={personal_epochs} must be an integer >= 1")
  personal_epochs = int(personal_epochs)

  def client_grad(params, ctx, batch, problem, key):
    del key
    return balanced_grad(params, ctx, batch, problem)

  def local_update(start, ctx, trainer):
    """The generic model on BSM for the round, then ``φ_k`` for ``E_p`` epochs."""
    problem = trainer.problem
    params, aux_sum, num_steps = trainer.train(
        start, lambda p, b, k: balanced_grad(p, ctx, b, problem))
    fixed = jax.lax.stop_gradient(params)

    def personal_grad(phi, batch, key):
      # CE of h_G(z) + h_P(z; φ); only φ is differentiated (z, ψ are constants).
      del key
      loss = lambda f: problem.objective(
          *problem.apply(summed_head(fixed["model"], f), batch.x), fixed["adapters"], batch)[0]
      return jax.grad(loss)(phi), {}

    phi, _, _ = trainer.train(ctx["head"], personal_grad, epochs=personal_epochs, stream=1)
    return params, {**ctx, "head": phi}, aux_sum, num_steps

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads ``(θ, ψ)_k − (θ, ψ)^t`` (FedAvg) and keeps ``φ_k``."""
    message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    return message, {"head": ctx["head"]}

  def eval_model(params, client_state, trainer):
    """Client ``k`` predicts ``h_G(z) + h_P(z; φ_k)`` with the global ``θ, ψ``."""
    model = summed_head(params["model"], client_state["head"])
    return lambda x: trainer.problem.apply(model, x)[0]

  return fedavg()._replace(
      name="fedrod", init_client_state=init_client_state, client_init=client_init,
      client_grad=client_grad, client_final=client_final, local_update=local_update,
      eval_model=eval_model)


# FedRoD (Chen & Chao, ICLR 2022): E_p = 5 epochs of personalized-head training
# per round (FedAIMS paper §5.1, methods §4); the generic model trains the
# round's epochs on the balanced softmax.
DEFAULTS = dict(personal_epochs=5)


def settings(config, name: str = "fedrod") -> dict:
  """:func:`fedrod`'s arguments from ``config.fl.<name>``."""
  return dict(personal_epochs=check_integer(config.fl[name].personal_epochs,
                                            f"fl.{name}.personal_epochs"))
