"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): fair and robust FL through personalization.

"Ditto: Fair and Robust Federated Learning Through Personalization", Algorithm 1.
Each client ``k`` keeps a personal model ``v_k`` next to the global model ``w``.
In round ``t`` a sampled client

1. updates the global model as the global solver does — here FedAvg's local
   SGD on its objective ``F_k`` for the round's epochs (``fl.local_epochs`` /
   ``fl.local_steps``), uploading ``w_k − w^t``;
2. updates its personal model for ``E_p`` epochs on
   ``h_k(v; w^t) = F_k(v) + (λ/2) ‖v − w^t‖²``, i.e. steps
   ``v_k ← v_k − η (∇F_k(v_k) + λ (v_k − w^t))``, anchored at the round's
   global model ``w^t`` (not at the client's updated ``w_k``).

The server averages the global updates as FedAvg; ``v_k`` never travels. The
personalized model evaluated on client ``k``'s own test split is ``v_k``.

In this library ``F_k`` is the client objective ``L_T`` (cross-entropy plus the
ISR terms), and ``v_k`` is a whole ``{"model", "adapters"}`` tree, so the
proximal term covers the ISR adapters too (as FedProx's does). The two local
runs use the engine's local optimizer; the personal run draws its own shuffle
(``stream=1``), the global run the round's (so Ditto's global update is
FedAvg's exactly).

Choices where the paper leaves room:

* ``v_k`` starts as the initial global model (PFLlib and FL-bench copy the
  initial model into every personal model), and a client that is never
  sampled keeps it.
* ``E_p`` counts epochs over the client's data (FedAIMS §5.1: ``E_p = 5``),
  independent of the round's ``fl.local_steps``.
* ``λ = 0`` makes ``v_k`` plain local training from its previous value (the
  Local baseline's model), ``λ → ∞`` pins it to ``w^t``.

Memory: ``v_k`` is a whole model per client, held in the stacked client state
``client_states["alg"]["v"]`` with a leading axis over all ``N`` clients:
``N × (model + adapter) bytes`` on top of the global model — linear in ``N``
(ResNet-18 at 11.2 M float32 parameters: 44.7 MB per client, 4.5 GB for 100
clients), sharded over the ``clients`` mesh axis when a mesh is used. Only the
sampled clients' rows are gathered into a round.
"""

from __future__ import annotations

import optax.tree_utils as otu

from isr_jax.config_checks import check_integer, check_number
from isr_jax.fl.algorithm import FLAlgorithm, grad_with_terms, loss_grad
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg


def init_client_state(params, client_data=None):
  """``v_k`` starts as the initial global model (model and adapters)."""
  del client_data
  return {"v": params}


def ditto(lam: float = 0.1, personal_epochs: int = 5) -> FLAlgorithm:
  """Ditto with proximal weight ``lam`` (λ ≥ 0) and ``personal_epochs`` (E_p ≥ 1)."""
  if lam < 0:
    raise ValueError(f"lam={lam} must be >= 0")
  if int(personal_epochs) != personal_epochs or personal_epochs < 1:
    raise ValueError(f"personal_epochs={personal_epochs} must be an integer >= 1")
  personal_epochs = int(personal_epochs)

  def local_update(start, ctx, trainer):
    """Algorithm 1, lines 5–9: the global run from ``w^t``, then ``E_p`` epochs on ``v_k``."""
    problem = trainer.problem
    w_k, aux_sum, num_steps = trainer.train(start, lambda p, b, k: loss_grad(p, b, problem))

    def personal_grad(v, batch, key):
      # ∇F_k(v) + λ (v − w^t), one forward pass of v.
      del key
      return grad_with_terms(v, batch, problem, lambda p, logits, taps: {
          "prox": (0.5 * lam, otu.tree_norm(otu.tree_sub(p, start), squared=True))})

    v_k, _, _ = trainer.train(ctx["v"], personal_grad, epochs=personal_epochs, stream=1)
    return w_k, {**ctx, "v": v_k}, aux_sum, num_steps

  def client_init(broadcast, client_state, client_data):
    del broadcast, client_data
    return {"v": client_state["v"]}

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads ``w_k − w^t`` (FedAvg) and keeps the trained ``v_k``."""
    message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    return message, {"v": ctx["v"]}

  def eval_model(params, client_state, trainer):
    """Client ``k``'s personalized model is ``v_k``."""
    del params
    return lambda x: trainer.problem.apply(client_state["v"]["model"], x)[0]

  return fedavg()._replace(
      name="ditto", init_client_state=init_client_state, client_init=client_init,
      client_final=client_final, local_update=local_update, eval_model=eval_model)


# Ditto (Li, Hu, Beirami, Smith, ICML 2021, Algorithm 1): λ = 0.1 and E_p = 5
# personal epochs per round, FedAIMS's settings (FedAIMS paper §5.1, methods §4).
DEFAULTS = dict(lam=0.1, personal_epochs=5)


def settings(config, name: str = "ditto") -> dict:
  """:func:`ditto`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(lam=check_number(c.lam, f"fl.{name}.lam", low=0),
              personal_epochs=check_integer(c.personal_epochs, f"fl.{name}.personal_epochs"))
