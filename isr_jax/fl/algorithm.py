"""The interface every federated algorithm implements.

An algorithm is a :class:`FLAlgorithm`: a NamedTuple of pure functions with
their own state, which the one round function (:mod:`isr_jax.fl.round`) calls
inside a single ``jit`` — ``client_*`` under the client-parallel map,
``server_update`` once per round. The split follows fedjax's
client_init / client_step / client_final, with the step reduced to the part
algorithms actually change: how the local gradient is formed. The local
optimizer (optax), the step masking, the data schedule and the aggregation
weights belong to the round, so an algorithm never re-implements them.

ISR is not an algorithm: it is the ``loss`` inside :class:`LocalProblem`, so any
algorithm composes with it unchanged.

Units: ``server_update`` returns the *pseudo-gradient* ``θ_t − θ̃_{t+1}``, a
parameter displacement. The round feeds it to the server's optax optimizer, so
SGD with learning rate 1 gives ``θ_{t+1} = θ̃_{t+1}`` (FedAvg), momentum gives
FedAvgM, Adam gives FedAdam (Reddi et al. 2021, Algorithm 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any  # {"model": ..., "adapters": ...} of arrays
PyTree = Any


class Batch(NamedTuple):
  """One local minibatch.

  Attributes:
    x: inputs ``[B, ...]``.
    y: labels ``[B]`` or ``[B, H, W]``.
    mask: ``[B]`` bool, False for padding examples.
    weight: optional per-example importance weight ``[B]`` (FedIR).
  """

  x: jax.Array
  y: jax.Array
  mask: jax.Array
  weight: jax.Array | None = None


class LocalProblem(NamedTuple):
  """What a client optimises. Both parts are pure; they close over the model graph.

  Attributes:
    apply: ``(model_params, x) -> (logits, taps)``, the forward pass.
    objective: ``(logits, taps, adapter_params, batch) -> (L_T, aux)``, the
      client objective on given outputs (Eq. 5, or plain CE when ISR is off);
      ``aux`` holds the per-term values. Split from ``apply`` so an algorithm
      that adds a term on the same features (MOON) needs one forward pass.
    representation: the tap that feeds the output head — the model's
      representation for algorithms that compare features (MOON, BalanceFL):
      ``features`` for the classifiers, ``decoder`` for the segmentation models.
  """

  apply: Callable[[PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
  objective: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  representation: str = "features"

  def loss(self, params: Params, batch: Batch):
    """``L_T`` at ``params = {"model", "adapters"}`` on ``batch``."""
    logits, taps = self.apply(params["model"], batch.x)
    return self.objective(logits, taps, params["adapters"], batch)


class ServerBroadcast(NamedTuple):
  """What every sampled client receives at the start of a round.

  Attributes:
    params: the global model and adapters (the client's own adapters when they
      are personal).
    alg_state: the algorithm's server state (e.g. SCAFFOLD's c).
    round: the round index t.
    local_lr: the clients' learning rate η_t this round.
    plan: this client's row of what :attr:`FLAlgorithm.plan_round` decided for
      the round's sampled clients (FedAIMS's supervised block); ``None`` when
      the algorithm plans nothing.
  """

  params: Params
  alg_state: PyTree
  round: jax.Array
  local_lr: jax.Array
  plan: PyTree = None


class FLAlgorithm(NamedTuple):
  """A federated algorithm as pure functions (see module docstring).

  Attributes:
    name: config name.
    init_server_state: ``(params, data) -> alg_state`` (server-side, e.g.
      SCAFFOLD's c), with ``data`` every client's packed data.
    init_client_state: ``(params, client_data) -> client_state`` for ONE
      client (vmapped over all clients); the round keeps the stacked copy with a
      leading client axis and gathers/scatters the sampled clients' rows
      (SCAFFOLD's c_i, FedDyn's h_i, MOON's previous model).
    client_init: ``(broadcast, client_state, client_data) -> ctx``, per-round
      constants of a client's local training (anchors, corrections, label
      statistics); ``client_data`` is the client's row of ``ClientData``.
    client_grad: ``(params, ctx, batch, problem, key) -> (grads, aux)``, the
      local gradient at ``params`` (plain ``∇L_T`` for FedAvg).
    client_final: ``(broadcast, ctx, local_params, num_steps, client_state)
      -> (message, new_client_state)``; ``message`` is what travels up.
    server_update: ``(params, alg_state, messages, weights) -> (pseudo_grad,
      alg_state)`` or ``(pseudo_grad, alg_state, metrics)``, with ``messages``
      stacked over the sampled clients and ``weights`` = ``|D_n| / Σ_k |D_k|``
      (zero for padding clients); ``metrics`` (scalars) are logged as
      ``server/<name>`` (FedExP's step size).
    server_optimizer: the server's optax optimizer when the algorithm defines
      it (FedAvgM's momentum, FedAdam); ``None`` uses ``fl.server_optimizer``.
    downlink: ``broadcast -> pytree``, what travels down to each client (for
      communication accounting); the uplink is the message itself.
    personal: the model part that stays on each client across rounds, one of
      :data:`isr_jax.fl.personal.PERSONAL_PARTS` (``""``: none; ``"head"``:
      FedPer, FedRep; ``"body"``: LG-FedAvg; ``"all"``: Local). The round keeps
      it in ``client_states["personal"]`` and starts the client from it.
    local_update: ``(start, ctx, trainer) -> (local_params, ctx, aux_sum,
      num_steps)``, the client's whole local training when it is more than one
      run of :attr:`client_grad` steps (FedRep's two phases, Ditto's personal
      model, FedALA's aggregation); ``trainer`` is a :class:`LocalTrainer`.
      ``None``: ``trainer.train(start, client_grad)``.
    eval_model: ``(params, client_state, trainer) -> predict`` for the
      personalized evaluation: ``predict(x) -> logits`` of client ``i``'s own
      model, ``params`` being the global tree with its personal leaves put in
      (FedBABU fine-tunes here, Ditto returns its personal model, FedRoD adds
      its personal head). ``None``: the model at ``params``.
    plan_round: ``(alg_state, client_states, ids) -> plan``, a server decision
      over ALL of the round's sampled clients taken before any of them trains
      (FedAIMS's supervision sampling, FedAIMS paper Algorithm 2):
      ``client_states`` are the sampled clients' algorithm states stacked in
      sampling order, ``ids`` their client ids (−1 for the padding clients that
      fill the mesh); ``plan`` is stacked the same way and each client gets its
      row as ``broadcast.plan``. ``None``: nothing to plan (``broadcast.plan`` is
      ``None``).
    mean_messages: ``server_update`` reads the messages only as their weighted
      mean ``weighted_sum(messages, weights)`` (FedAvg's rule, which most
      algorithms reuse). The round then hands it that mean as the only message,
      weight 1, summed client by client as each finishes: the messages of a
      ``sequential``/``chunked`` round take the memory of one client, not of
      every sampled client.
  """

  name: str
  init_server_state: Callable[[Params], PyTree]
  init_client_state: Callable[[Params], PyTree]
  client_init: Callable[[ServerBroadcast, PyTree], PyTree]
  client_grad: Callable[..., tuple[Params, dict[str, jax.Array]]]
  client_final: Callable[..., tuple[PyTree, PyTree]]
  server_update: Callable[..., tuple[Params, PyTree]]
  server_optimizer: Any = None
  downlink: Callable[[ServerBroadcast], PyTree] = lambda broadcast: broadcast.params
  personal: str = ""
  local_update: Callable[..., tuple[Params, PyTree, dict, jax.Array]] | None = None
  eval_model: Callable[..., Callable[[jax.Array], jax.Array]] | None = None
  plan_round: Callable[..., PyTree] | None = None
  mean_messages: bool = False


class LocalTrainer(NamedTuple):
  """What the round lends an algorithm's ``local_update`` and ``eval_model``: one client's
  data and the engine's local optimizer, schedule and step masking.

  Attributes:
    train: ``(start, grad_fn, *, epochs=None, trainable=None, stream=0, project=None) ->
      (params, aux_sum, num_steps)``: local SGD from ``start`` with ``grad_fn(params,
      batch, key) -> (grads, aux)`` for ``epochs`` epochs (``None``: the round's
      ``fl.local_epochs`` / ``fl.local_steps``); ``trainable(path) -> bool`` freezes
      the other leaves (their update is zeroed after the optimizer, so weight decay
      and momentum cannot move them); it may return a traced boolean scalar when
      the choice is made inside the round (FedAIMS's sampled block, from
      ``broadcast.plan``); ``stream`` picks an independent shuffle; ``project(params)
      -> params`` runs after every step (APFL projects its mixing weight to [0, 1]).
    problem: the client objective.
    data: the client's row of ``ClientData`` (``[S, B, ...]``).
    key: the client's PRNG key this round.
  """

  train: Callable[..., tuple[Params, dict, jax.Array]]
  problem: LocalProblem
  data: Any
  key: jax.Array


def loss_grad(params: Params, batch: Batch, problem: LocalProblem):
  """``∇L_T`` at ``params`` with the per-term aux values."""
  (_, aux), grads = jax.value_and_grad(problem.loss, has_aux=True)(params, batch)
  return grads, aux


def grad_with_terms(params: Params, batch: Batch, problem: LocalProblem, terms: Callable):
  """``∇(L_T + Σ_n w_n T_n)`` with ONE forward pass of the local model.

  Args:
    params: local parameters.
    batch: the minibatch.
    problem: the client objective.
    terms: ``(params, logits, taps) -> {name: (weight, value)}``, extra terms
      (a proximal penalty, MOON's contrastive loss, FedNTD's distillation).

  Returns:
    ``(grads, aux)``: ``aux`` has the objective's terms, each extra term's
    unweighted value under its name, and ``total``.
  """

  def total(p):
    logits, taps = problem.apply(p["model"], batch.x)
    value, aux = problem.objective(logits, taps, p["adapters"], batch)
    extra = terms(p, logits, taps)
    for weight, term in extra.values():
      value = value + weight * term
    return value, {**aux, **{name: term for name, (_, term) in extra.items()}, "total": value}

  (_, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
  return grads, aux


def weighted_sum(stacked: PyTree, weights: jax.Array) -> PyTree:
  """``Σ_n w_n x_n`` over the leading (client) axis of every leaf."""
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def no_state(params: Params, data: Any = None) -> dict:
  del params, data
  return {}


def no_context(broadcast: ServerBroadcast, client_state: PyTree, client_data: Any) -> dict:
  del broadcast, client_state, client_data
  return {}


def tree_bytes(tree: PyTree) -> int:
  """Bytes of every array in ``tree`` (static: shapes and dtypes only)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
