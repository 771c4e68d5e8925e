"""One federated round as one pure function, jitted once by the caller.

``fl_round`` samples clients, gathers their data and persistent state, runs
every client's local training under :func:`isr_jax.fl.client.map_clients`
(``vmap`` by default), lets the algorithm turn the stacked messages (or, for
FedAvg's rule, their weighted mean summed client by client) into a
pseudo-gradient, and applies the server's optax optimizer
(papers/omniisr.txt Algorithm 1, FL branch). There is no Python loop over
clients or steps and no host transfer inside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import (
    Batch,
    FLAlgorithm,
    LocalProblem,
    LocalTrainer,
    ServerBroadcast,
    loss_grad,
    weighted_sum,
)
from isr_jax.fl.client import batch_schedule, map_clients, resolve_parallelism, run_local_steps
from isr_jax.fl.personal import merge, personal_predicate, select, travelling_bytes, zero_personal
from isr_jax.optim import with_learning_rate
from isr_jax.sharding import padded_count
from isr_jax.state import TrainState


class FLSpec(NamedTuple):
  """Static settings of a federated round.

  Attributes:
    clients_per_round: clients sampled (without replacement) each round.
    local_epochs: local epochs E (when ``local_steps == 0``).
    local_steps: fixed local steps per client (0 = epochs mode).
    parallelism: ``auto``, ``vmap``, ``chunked`` or ``sequential``.
    chunk_size: clients per chunk for ``chunked``.
    aggregate_adapters: average the ISR adapters (methods §2); else they are personal.
    unroll: ``lax.scan`` unroll of the local steps.
    num_clients: clients to sample from (0 = every row of the data). Rows past it
      are padding added to fill the mesh.
    mesh: shard the sampled clients over this mesh's ``clients`` axis; their
      number is padded up to a multiple of its size with empty clients.
    measure_heterogeneity: also report ``fl/heterogeneity``, the gradient
      dissimilarity ``H_t`` of OmniISR Eq. 13 (one extra gradient per client).
  """

  clients_per_round: int
  local_epochs: int = 1
  local_steps: int = 0
  parallelism: str = "auto"
  chunk_size: int = 0
  aggregate_adapters: bool = True
  unroll: int = 1
  num_clients: int = 0
  mesh: Mesh | None = None
  measure_heterogeneity: bool = False


class RoundFns(NamedTuple):
  """The pieces a round is built from (static under jit)."""

  algorithm: FLAlgorithm
  problem: LocalProblem
  local_optimizer: optax.GradientTransformation
  local_lr: Callable[[jax.Array], jax.Array]
  server_optimizer: optax.GradientTransformation


def sample_clients(key: jax.Array, num_clients: int, k: int) -> jax.Array:
  """``k`` distinct client indices, uniformly at random."""
  return jax.random.choice(key, num_clients, (k,), replace=False)


def round_keys(state: TrainState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sampling, clients, cloud) keys of the current round, derived from ``state.rng``."""
  key = jax.random.fold_in(state.rng, state.round)
  return tuple(jax.random.split(key, 3))  # type: ignore[return-value]


def _trainable_flag(value, path):
  """``trainable(path)`` as a Python bool, or as a boolean scalar array when it is traced."""
  if isinstance(value, jax.Array):
    if value.shape != () or value.dtype != jnp.bool_:
      raise ValueError(f"trainable({jax.tree_util.keystr(path)}) must be a bool or a boolean "
                       f"scalar; got {value.dtype}{list(value.shape)}")
    return value
  return bool(value)


def _freeze(optimizer: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """``optimizer`` whose updates of the leaves where ``trainable`` is False are zero.

  Zeroing the update (not the gradient) keeps weight decay and momentum from
  moving a frozen leaf; the optimizer's state keeps its structure. A flag may be
  a traced boolean scalar, decided per client inside the round (FedAIMS's
  sampled block): that leaf's update is selected with ``jnp.where``, the update or
  exactly zero. Python flags stay static, so their graph is unchanged.
  """

  def freeze(u, t):
    if isinstance(t, jax.Array):
      return jnp.where(t, u, jnp.zeros_like(u))
    return u if t else jnp.zeros_like(u)

  def update(grads, state, params=None):
    updates, state = optimizer.update(grads, state, params)
    return jax.tree.map(freeze, updates, trainable), state

  return optax.GradientTransformation(optimizer.init, update)


def make_trainer(cdata: ClientData, key: jax.Array, lr: jax.Array, fns: RoundFns,
                 spec: FLSpec) -> LocalTrainer:
  """Client ``cdata``'s :class:`LocalTrainer`: local SGD on its own data this round."""
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  x, y, slot_mask = flat(cdata.x), flat(cdata.y), cdata.mask.reshape(-1)

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0):
    k = key if stream == 0 else jax.random.fold_in(key, 7919 + stream)
    round_schedule = epochs is None
    idx, valid = batch_schedule(
        k, slot_mask, cdata.mask.shape[-1],
        epochs=spec.local_epochs if round_schedule else epochs,
        steps=spec.local_steps if round_schedule else 0)
    optimizer = fns.local_optimizer
    if trainable is not None:
      mask = jax.tree_util.tree_map_with_path(
          lambda path, _: _trainable_flag(trainable(path), path), start)
      optimizer = _freeze(optimizer, mask)
    opt_state = with_learning_rate(optimizer.init(start), lr)
    params, _, aux_sum, num_steps = run_local_steps(
        start, opt_state, x, y, idx, valid, grad_fn=grad_fn, optimizer=optimizer, key=k,
        unroll=spec.unroll, all_or_none=round_schedule and spec.local_steps > 0)
    return params, aux_sum, num_steps

  return LocalTrainer(train=train, problem=fns.problem, data=cdata, key=key)


def size_balanced_order(num_examples: jax.Array, spec: FLSpec) -> jax.Array:
  """The order in which the sampled clients enter the client map.

  ``sequential`` on one device runs each client for its own steps: sampling
  order. Otherwise the clients are sorted by size, largest first, and dealt to
  the mesh's devices in snake order (0, 1, …, D−1, D−1, …, 0, …), so each
  device gets a near-equal share of the work and, within a device, consecutive
  clients — a ``chunked`` chunk, the lanes of a ``vmap`` — have similar sizes:
  a chunk's cost is its largest client's, and the round's approaches
  Σ steps / chunk.
  """
  k = num_examples.shape[0]
  devices = 1 if spec.mesh is None else spec.mesh.size
  if k == 1 or (devices == 1 and resolve_parallelism(spec.parallelism) == "sequential"):
    return jnp.arange(k)
  by_size = jnp.argsort(-num_examples, stable=True)
  per_device = k // devices
  rank = jnp.arange(per_device)[None, :]            # position within a device
  device = jnp.arange(devices)[:, None]
  snake = jnp.where(rank % 2 == 0, device, devices - 1 - device)
  return by_size[(rank * devices + snake).reshape(-1)]


def federated_update(state: TrainState, data: ClientData, fns: RoundFns, spec: FLSpec):
  """Local training on the sampled clients and the algorithm's server rule.

  Returns:
    ``(pseudo_grad, alg_state, client_states, metrics)``: the federated
    pseudo-gradient ``θ_t − θ̃_{t+1}``, the algorithm's new server state, the
    updated stacked per-client state, and round metrics (means over the steps
    that ran).
  """
  alg = fns.algorithm
  personal = personal_predicate(alg.personal, spec.aggregate_adapters)
  k_sample, k_clients, _ = round_keys(state)
  num_rows = data.num_clients
  k = spec.clients_per_round
  sampled = sample_clients(k_sample, spec.num_clients or num_rows, k)
  # Padding clients (id −1) fill the mesh: no examples, weight 0, never written back.
  ids = jnp.concatenate([sampled, -jnp.ones(padded_count(k, spec.mesh) - k, sampled.dtype)])
  real = ids >= 0
  rows = jnp.where(real, ids, 0)
  take = lambda tree: jax.tree.map(lambda a: jnp.take(a, rows, axis=0), tree)
  client_data, client_states = take(data), take(state.client_states)
  client_data = client_data._replace(
      mask=client_data.mask & real[:, None, None],
      num_examples=jnp.where(real, client_data.num_examples, 0))
  lr = fns.local_lr(state.round)
  batch_size = data.batch_size
  # A decision over all sampled clients before any trains (FedAIMS's Algorithm 2);
  # each client receives its row. None (no leaves) for every other algorithm.
  plans = (None if alg.plan_round is None
           else alg.plan_round(state.alg_state, client_states["alg"], ids))

  def one_client(cdata: ClientData, cstate, client_id, plan, params, alg_state, round_index,
                 lr):
    start = merge(params, cstate.get("personal", {}))
    broadcast = ServerBroadcast(start, alg_state, round_index, lr, plan)
    ctx = alg.client_init(broadcast, cstate["alg"], cdata)
    key = jax.random.fold_in(k_clients, client_id)
    trainer = make_trainer(cdata, key, lr, fns, spec)
    if alg.local_update is None:
      params, aux_sum, num_steps = trainer.train(
          start, lambda p, b, k: alg.client_grad(p, ctx, b, fns.problem, k))
    else:
      params, ctx, aux_sum, num_steps = alg.local_update(start, ctx, trainer)
    message, new_alg_state = alg.client_final(broadcast, ctx, params, num_steps, cstate["alg"])
    new_cstate = {**cstate, "alg": new_alg_state}
    if "personal" in cstate:
      new_cstate["personal"] = select(params, personal)
    drift = otu.tree_norm(otu.tree_sub(params["model"], start["model"]), squared=True)
    grad_at_start = {}
    if spec.measure_heterogeneity:  # ∇L_T^n(θ_t), estimated on the first scheduled batch
      idx, valid = batch_schedule(key, cdata.mask.reshape(-1), batch_size,
                                  epochs=spec.local_epochs, steps=spec.local_steps)
      flat = lambda a: a.reshape((-1,) + a.shape[2:])
      first = Batch(flat(cdata.x)[idx[0]], flat(cdata.y)[idx[0]], valid[0])
      grad_at_start, _ = loss_grad(start, first, fns.problem)
    outputs = (new_cstate, aux_sum, num_steps, drift, grad_at_start)
    if alg.mean_messages:  # n_i·m_i, summed over the clients as they finish
      n = cdata.num_examples.astype(jnp.float32)
      return outputs, jax.tree.map(lambda m: n.astype(m.dtype) * m, message)
    return (message, *outputs)

  # Lanes that run side by side (a vmapped chunk, a device's share) cost their
  # largest client, so they are filled with clients of similar size; the
  # results are put back in sampling order before anything is aggregated.
  order = size_balanced_order(client_data.num_examples, spec)
  inverse = jnp.argsort(order)
  permute = lambda tree, o: jax.tree.map(lambda a: jnp.take(a, o, axis=0), tree)
  outputs = map_clients(
      one_client, permute((client_data, client_states, ids, plans), order),
      (state.params, state.alg_state, state.round, lr),
      strategy=spec.parallelism, chunk_size=spec.chunk_size, mesh=spec.mesh,
      summed=alg.mean_messages,
  )
  n = client_data.num_examples.astype(jnp.float32)
  total_examples = jnp.maximum(jnp.sum(n), 1.0)
  weights = n / total_examples
  if alg.mean_messages:
    outputs, summed = outputs
    # Σ_i n_i m_i / Σ_i n_i = Σ_i w_i m_i: the one message the rule reads, weight 1.
    messages = jax.tree.map(lambda s: (s / total_examples.astype(s.dtype))[None], summed)
    message_weights = jnp.ones((1,), jnp.float32)
    new_states, aux_sum, num_steps, drift, grads = permute(outputs, inverse)
  else:
    messages, new_states, aux_sum, num_steps, drift, grads = permute(outputs, inverse)
    message_weights = weights
  # What stays on the clients reaches the server as zero, so no server rule can
  # use it (SCAFFOLD's c, FedDyn's h would otherwise accumulate personal updates),
  # and it never moves the global tree.
  received = zero_personal(messages, personal)
  pseudo_grad, alg_state = alg.server_update(state.params, state.alg_state, received,
                                             message_weights)
  pseudo_grad = zero_personal(pseudo_grad, personal)
  scatter_rows = jnp.where(real, ids, num_rows)  # out of range: dropped
  client_states = jax.tree.map(
      lambda full, new: full.at[scatter_rows].set(new, mode="drop"),
      state.client_states, new_states)
  total_steps = jnp.maximum(jnp.sum(num_steps), 1)
  metrics = {f"train/{k}": jnp.sum(v) / total_steps for k, v in aux_sum.items()}
  metrics["train/loss"] = metrics.pop("train/total")
  metrics["fl/client_drift"] = jnp.sum(weights * drift)  # Lemma 2: Σ w_n ‖δ_n‖²
  if spec.measure_heterogeneity:
    # Eq. 13 with ∇L_T(θ_t) = Σ_n w_n ∇L_T^n(θ_t):  H_t = Σ w_n ‖g_n‖² − ‖Σ w_n g_n‖².
    sq = jax.vmap(lambda g: otu.tree_norm(g, squared=True))(grads)
    mean = weighted_sum(grads, weights)
    metrics["fl/heterogeneity"] = jnp.sum(weights * sq) - otu.tree_norm(mean, squared=True)
  metrics["fl/local_steps"] = jnp.sum(num_steps) / jnp.maximum(jnp.sum(real), 1)
  # Communication per real sampled client: the message up, the algorithm's
  # downlink down, less the personal leaves; shapes are static.
  num_real = jnp.sum(client_data.num_examples > 0).astype(jnp.float32)
  one_message = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype), messages)
  broadcast = ServerBroadcast(state.params, state.alg_state, state.round, lr)
  up = travelling_bytes(one_message, personal)
  down = travelling_bytes(alg.downlink(broadcast), personal)
  metrics["comm/up_bytes"] = num_real * up
  metrics["comm/down_bytes"] = num_real * down
  return pseudo_grad, alg_state, client_states, metrics


def apply_server_step(state: TrainState, pseudo_grad, server_optimizer):
  """``θ_{t+1} = θ_t + server_opt(pseudo_grad)``; SGD(lr=1) gives ``θ̃_{t+1}``."""
  updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def fl_round(state: TrainState, data: ClientData, *, fns: RoundFns, spec: FLSpec):
  """One FL round: ``state -> (state, metrics)``. Jit it with ``donate_argnums=0``."""
  pseudo_grad, alg_state, client_states, metrics = federated_update(state, data, fns, spec)
  params, opt_state = apply_server_step(state, pseudo_grad, fns.server_optimizer)
  new_state = state._replace(
      params=params, opt_state=opt_state, alg_state=alg_state,
      client_states=client_states, round=state.round + 1,
  )
  return new_state, metrics


def init_client_states(algorithm: FLAlgorithm, params: Any, data: ClientData,
                       aggregate_adapters: bool) -> dict:
  """The stacked per-client state ``[num_clients, ...]`` for a fresh run.

  ``{"alg": the algorithm's client state, "personal": the leaves that stay on the
  clients}`` (``personal`` only when there are any), every client's personal
  leaves starting from the initial global ones.
  """
  states = {"alg": jax.vmap(algorithm.init_client_state, in_axes=(None, 0))(params, data)}
  own = select(params, personal_predicate(algorithm.personal, aggregate_adapters))
  if own:
    states["personal"] = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (data.num_clients, *jnp.shape(a))).copy(), own)
  return states
