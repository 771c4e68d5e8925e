"""One federated round as one pure function, jitted once by the caller.

``fl_round`` samples clients, gathers their data and persistent state, runs
every client's local training under :func:`isr_jax.fl.client.map_clients`
(``vmap`` by default), lets the algorithm turn the stacked messages into a
pseudo-gradient, and applies the server's optax optimizer
(papers/omniisr.txt Algorithm 1, FL branch). There is no Python loop over
clients or steps and no host transfer inside it.
"""

from __future__ import annotations

import math
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
    ServerBroadcast,
    loss_grad,
    weighted_sum,
)
from isr_jax.fl.client import batch_schedule, map_clients, run_local_steps
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
    aggregate_adapters: average the ISR adapters (SPEC §2); else they are personal.
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


def _is_personal(path, aggregate_adapters: bool) -> bool:
  """Whether a leaf (by its key path) is part of the personal ISR adapters.

  Every params-shaped tree is ``{"model", "adapters"}``, so a message, a downlink
  or a state that holds one (SCAFFOLD's ``{"delta", "delta_c"}``, its
  ``{"params", "c"}``) has an ``adapters`` key above each adapter leaf.
  """
  return not aggregate_adapters and any(
      isinstance(k, jax.tree_util.DictKey) and k.key == "adapters" for k in path)


def travelling_bytes(tree, aggregate_adapters: bool) -> int:
  """Bytes of the leaves of ``tree`` that cross the network (static: shapes and dtypes).

  Personal adapters (``aggregate_adapters=False``) never leave their client, in
  either direction.
  """
  return sum(math.prod(x.shape) * x.dtype.itemsize
             for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if not _is_personal(path, aggregate_adapters))


def _as_received(messages, aggregate_adapters: bool):
  """The messages as the server receives them: what stays on the clients is zero.

  The server's rule then cannot use what never travelled (SCAFFOLD's ``c`` and
  FedDyn's ``h`` would otherwise accumulate the personal adapters' updates).
  """
  if aggregate_adapters:
    return messages
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if _is_personal(path, False) else x, messages)


def _client_start(params, client_state, aggregate_adapters: bool):
  if aggregate_adapters:
    return params
  return {"model": params["model"], "adapters": client_state["adapters"]}


def federated_update(state: TrainState, data: ClientData, fns: RoundFns, spec: FLSpec):
  """Local training on the sampled clients and the algorithm's server rule.

  Returns:
    ``(pseudo_grad, alg_state, client_states, metrics)``: the federated
    pseudo-gradient ``θ_t − θ̃_{t+1}``, the algorithm's new server state, the
    updated stacked per-client state, and round metrics (means over the steps
    that ran).
  """
  alg = fns.algorithm
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

  def one_client(cdata: ClientData, cstate, client_id, params, alg_state, round_index, lr):
    start = _client_start(params, cstate, spec.aggregate_adapters)
    broadcast = ServerBroadcast(start, alg_state, round_index, lr)
    ctx = alg.client_init(broadcast, cstate["alg"], cdata)
    key = jax.random.fold_in(k_clients, client_id)
    idx, valid = batch_schedule(
        key, cdata.mask.reshape(-1), batch_size,
        epochs=spec.local_epochs, steps=spec.local_steps,
    )
    opt_state = with_learning_rate(fns.local_optimizer.init(start), lr)
    grad_fn = lambda p, b, k: alg.client_grad(p, ctx, b, fns.problem, k)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])
    params, _, aux_sum, num_steps = run_local_steps(
        start, opt_state, flat(cdata.x), flat(cdata.y), idx, valid,
        grad_fn=grad_fn, optimizer=fns.local_optimizer, key=key, unroll=spec.unroll,
        all_or_none=spec.local_steps > 0,
    )
    message, new_alg_state = alg.client_final(broadcast, ctx, params, num_steps, cstate["alg"])
    new_cstate = {**cstate, "alg": new_alg_state}
    if not spec.aggregate_adapters:
      new_cstate["adapters"] = params["adapters"]
    drift = otu.tree_norm(otu.tree_sub(params["model"], start["model"]), squared=True)
    grad_at_start = {}
    if spec.measure_heterogeneity:  # ∇L_T^n(θ_t), estimated on the first scheduled batch
      first = Batch(flat(cdata.x)[idx[0]], flat(cdata.y)[idx[0]], valid[0])
      grad_at_start, _ = loss_grad(start, first, fns.problem)
    return message, new_cstate, aux_sum, num_steps, drift, grad_at_start

  messages, new_states, aux_sum, num_steps, drift, grads = map_clients(
      one_client, (client_data, client_states, ids),
      (state.params, state.alg_state, state.round, lr),
      strategy=spec.parallelism, chunk_size=spec.chunk_size, mesh=spec.mesh,
  )
  n = client_data.num_examples.astype(jnp.float32)
  weights = n / jnp.maximum(jnp.sum(n), 1.0)
  received = _as_received(messages, spec.aggregate_adapters)
  pseudo_grad, alg_state = alg.server_update(state.params, state.alg_state, received, weights)
  if not spec.aggregate_adapters:
    # Personal adapters never move the global ones through the federated path.
    pseudo_grad = {**pseudo_grad, "adapters": otu.tree_zeros_like(pseudo_grad["adapters"])}
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
  # downlink down, less the personal adapters; shapes are static.
  num_real = jnp.sum(client_data.num_examples > 0).astype(jnp.float32)
  one_message = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype), messages)
  broadcast = ServerBroadcast(state.params, state.alg_state, state.round, lr)
  up = travelling_bytes(one_message, spec.aggregate_adapters)
  down = travelling_bytes(alg.downlink(broadcast), spec.aggregate_adapters)
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
  """The stacked per-client state ``[num_clients, ...]`` for a fresh run."""
  states = {"alg": jax.vmap(algorithm.init_client_state, in_axes=(None, 0))(params, data)}
  if not aggregate_adapters:
    states["adapters"] = jax.tree.map(
        lambda a: jnp.broadcast_to(a, (data.num_clients, *jnp.shape(a))).copy(),
        params["adapters"])
  return states
