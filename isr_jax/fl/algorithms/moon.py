"""MOON (Li, He, Song, CVPR 2021): model-contrastive federated learning.

"Model-Contrastive Federated Learning", §3, Eq. 3–4. With ``z`` the local
model's representation of an input, ``z_glob`` that of the round's global model
and ``z_prev`` that of the client's own model after its previous local training,

``ℓ_con = −log( exp(sim(z, z_glob)/τ) / (exp(sim(z, z_glob)/τ) + exp(sim(z, z_prev)/τ)) )``

(Eq. 3, ``sim`` = cosine similarity) and the local objective is
``ℓ = ℓ_sup + μ ℓ_con`` (Eq. 4), here ``L_T + μ ℓ_con`` with ``L_T`` the client
objective (CE plus the ISR terms) on the same forward pass; ``ℓ_con`` is
averaged over the batch's real examples. The server averages as FedAvg
(Algorithm 1). Only the model delta travels: the previous model stays on the
client (per-client state, gathered and scattered by the round).

Choices where the paper leaves room:

* Representation: the model's last tap, ``problem.representation`` — the tap
  that feeds the output layer. MOON's network (§3.1, §4.1) is a base encoder, a
  projection head (a 2-layer MLP, output dimension 256) and an output layer fed
  by the projection; ``ℓ_con`` compares the projection's output. That head is
  part of the model, not of the algorithm (the output layer consumes it), so it
  is the model option ``model.options.projection_dim`` (256 for the paper's
  network; :mod:`isr_jax.models.projection`): with it, the last tap is
  ``projection`` and MOON contrasts exactly what the paper contrasts. Without
  it (every model's default) MOON contrasts the output layer's input —
  ``features`` for the classifiers, ``decoder`` for the segmentation models.
  Like the paper, which runs every baseline on the same network with the
  head, an experiment chooses the network once for all algorithms. ISR is
  unaffected either way: its taps and adapters are the encoder's. Dense
  representations are flattened per example before the cosine similarity.
* ``z_prev``: the model part only (ISR adapters are not part of a
  representation). It starts as the initial global model, as the authors' code
  does before a client's first participation, so in the first round
  ``sim(z, z_glob) = sim(z, z_prev)`` and ``ℓ_con`` has zero gradient.
* Defaults: ``μ = 1`` and ``τ = 0.5``. The paper tunes μ over
  {0.1, 1, 5, 10} per dataset and picks 5 for CIFAR-10, 1 for CIFAR-100 and
  Tiny-ImageNet (§4.1); 1 is also its code's default and FedAIMS's setting
  (FedAIMS paper §5.1). μ = 5 belongs to its CIFAR-10 regime of 10 local
  epochs (hundreds of local steps) per round: with one short local epoch, as in
  the digits comparison, the contrastive term outweighs the supervised loss for
  the first rounds and training starts late (experiments/RESULTS.md at commit cc57a03).
  ``μ = 0`` is FedAvg exactly.
* One negative (the previous model), the paper's default buffer size of 1.

``moon_proximal_loss`` is ``μ ℓ_con`` with the proximal-loss signature, for
FedSoL's composition (FedSoL paper App. H, ``fl.fedsol.proximal="moon"``);
there ``anchor`` is the global model and ``ctx`` MOON's own client context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm, grad_with_terms
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import position_mean

COSINE_EPS = 1e-8  # as torch.nn.CosineSimilarity, which the authors' code uses


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
  """Row-wise ``⟨a, b⟩ / max(‖a‖ ‖b‖, eps)`` of ``[B, D]`` arrays; finite gradient at 0."""
  squared = jnp.sum(a * a, axis=-1) * jnp.sum(b * b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.sqrt(jnp.maximum(squared, eps * eps))


def contrastive_loss(z, z_glob, z_prev, *, tau: float, mask, weight=None) -> jax.Array:
  """Eq. 3, averaged over the batch's real examples (representations ``[B, ...]``)."""
  flat = lambda t: t.reshape(t.shape[0], -1)
  pos = cosine_similarity(flat(z), flat(z_glob)) / tau
  neg = cosine_similarity(flat(z), flat(z_prev)) / tau
  per_example = jnp.logaddexp(pos, neg) - pos
  return position_mean(per_example, jnp.ones_like(mask), mask, weight)


def _features(taps, problem) -> jax.Array:
  if problem.representation not in taps:
    raise ValueError(f"moon: the representation tap {problem.representation!r} is not among "
                     f"the model's taps {sorted(taps)}")
  return taps[problem.representation]


def _frozen_features(model_params, problem, x) -> jax.Array:
  return _features(problem.apply(jax.lax.stop_gradient(model_params), x)[1], problem)


def moon_proximal_loss(mu: float, tau: float):
  """``μ ℓ_con`` as a proximal loss ``(params, anchor, ctx, batch, problem, key)``.

  ``anchor["model"]`` gives ``z_glob`` and ``ctx["prev"]`` (MOON's context) ``z_prev``.
  """

  def loss(params, anchor, ctx, batch, problem, key):
    del key
    z = _features(problem.apply(params["model"], batch.x)[1], problem)
    z_glob = _frozen_features(anchor["model"], problem, batch.x)
    z_prev = _frozen_features(ctx["prev"], problem, batch.x)
    return mu * contrastive_loss(z, z_glob, z_prev, tau=tau, mask=batch.mask,
                                 weight=batch.weight)

  return loss


def init_client_state(params, client_data=None):
  """The previous local model starts as the initial global model (model part)."""
  del client_data
  return {"prev": params["model"]}


def client_init(broadcast, client_state, client_data):
  del client_data
  return {"global": broadcast.params, "prev": client_state["prev"]}


def client_final(broadcast, ctx, local_params, num_steps, client_state):
  """Uploads ``θ_n − θ_t`` and keeps ``θ_n`` (model part) as the next ``z_prev`` model."""
  message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
  return message, {"prev": local_params["model"]}


def moon(mu: float = 1.0, tau: float = 0.5) -> FLAlgorithm:
  """MOON with contrastive weight ``mu`` (μ ≥ 0) and temperature ``tau`` (τ > 0)."""
  if mu < 0:
    raise ValueError(f"mu={mu} must be >= 0")
  if tau <= 0:
    raise ValueError(f"tau={tau} must be > 0")

  def client_grad(params, ctx, batch, problem, key):
    """``∇(L_T + μ ℓ_con)``; the local model runs forward once."""
    del key
    z_glob = _frozen_features(ctx["global"]["model"], problem, batch.x)
    z_prev = _frozen_features(ctx["prev"], problem, batch.x)
    return grad_with_terms(params, batch, problem, lambda p, logits, taps: {
        "con": (mu, contrastive_loss(_features(taps, problem), z_glob, z_prev, tau=tau,
                                     mask=batch.mask, weight=batch.weight))})

  return fedavg()._replace(
      name="moon", init_client_state=init_client_state, client_init=client_init,
      client_grad=client_grad, client_final=client_final)


# MOON (Li, He, Song, CVPR 2021, §4.1): τ = 0.5; μ = 1, the paper's pick for
# CIFAR-100 and Tiny-ImageNet from {0.1, 1, 5, 10} (5 for CIFAR-10, in a regime
# of 10 local epochs per round) and its code's default (QinbinLi/MOON main.py);
# also FedAIMS's (FedAIMS paper §5.1). The paper's projection head (output
# 256) is part of the network: model.options.projection_dim = 256.
DEFAULTS = dict(mu=1.0, tau=0.5)


def settings(config, name: str = "moon") -> dict:
  """:func:`moon`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(mu=check_number(c.mu, f"fl.{name}.mu", low=0),
              tau=check_number(c.tau, f"fl.{name}.tau", low=0, low_open=True))
