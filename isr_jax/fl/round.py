"""One federated round as one pure function, and :func:`make_round`, which builds one.

``fl_round`` is a short composition of the round's parts: the clients are
selected and their rows gathered (:mod:`isr_jax.fl.selection`), every sampled
client trains under the client map (:mod:`isr_jax.fl.trainer`,
:mod:`isr_jax.fl.aggregation`, ``vmap`` by default), the channel acts on
their messages (dropouts and stragglers before training, compression as each
client sends, attacks and DP or a robust rule as the server receives:
:mod:`isr_jax.fl.channel`), the algorithm turns the stacked messages (or, for
FedAvg's rule, their weighted mean summed client by client) into a
pseudo-gradient, the server's optax optimizer applies it
(methods §2, OmniISR Algorithm 1, FL branch), and the round reports what it did
(:mod:`isr_jax.fl.accounting`). There is no Python loop over clients or steps
and no host transfer inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from isr_jax.data.packing import ClientData
from isr_jax.fl.accounting import traffic_metrics, training_metrics
from isr_jax.fl.aggregation import run_clients, server_step
from isr_jax.fl.algorithm import FLAlgorithm, LocalProblem, ServerBroadcast
from isr_jax.fl.channel.pipeline import (
    channel_keys,
    init_client_state,
    init_server_state,
    leaf_bytes,
    message_shapes,
    prepare,
    receive,
)
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.personal import personal_predicate, select, zero_personal
from isr_jax.fl.selection import ClientRows, round_keys, scatter_states, select_clients
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import client_round
from isr_jax.state import TrainState


class FederatedUpdate(NamedTuple):
  """What the clients and the server's rule made of a round, before the server step.

  Attributes:
    pseudo_grad: the federated pseudo-gradient ``θ_t − θ̃_{t+1}``.
    alg_state: the algorithm's new server state.
    client_states: the updated stacked per-client state.
    channel_state: the channel's new server state (:mod:`isr_jax.fl.channel`).
    metrics: round metrics (means over the steps that ran).
  """

  pseudo_grad: Any
  alg_state: Any
  client_states: Any
  channel_state: Any
  metrics: dict


def federated_update(state: TrainState, data: ClientData | ClientRows, fns: RoundFns,
                     spec: FLSpec) -> FederatedUpdate:
  """Local training on the sampled clients, the channel, and the algorithm's server rule.

  ``data``: the population's packed data, or the round's clients gathered before
  it (:class:`~isr_jax.fl.selection.ClientRows`, ``state.client_states`` their rows).
  """
  alg = fns.algorithm
  channel = spec.channel
  personal = personal_predicate(alg.personal, spec.aggregate_adapters)
  k_sample, k_clients, _ = round_keys(state)
  keys = channel_keys(state.rng, state.round)
  sampled = select_clients(k_sample, data, state.client_states, spec)
  sampled, lanes = prepare(keys.lanes, sampled, channel)
  lr = fns.local_lr(state.round)
  # A decision over all sampled clients before any trains (FedAIMS's Algorithm 2);
  # each client receives its row. None (no leaves) for every other algorithm.
  plans = (None if alg.plan_round is None
           else alg.plan_round(state.alg_state, sampled.states["alg"], sampled.ids))
  results = run_clients(client_round(fns, spec, k_clients, keys.send, personal), sampled,
                        plans, lanes, (state.params, state.alg_state, state.round, lr), spec,
                        alg.mean_messages and not channel.reads_each_message)
  # What stays on the clients reaches the server as zero, so no server rule can
  # use it (SCAFFOLD's c, FedDyn's h would otherwise accumulate personal updates),
  # and it never moves the global tree.
  received = receive(keys.receive, zero_personal(results.messages, personal),
                     results.message_weights, sampled.real, lanes, state.channel_state, channel)
  pseudo_grad, alg_state, server_metrics = server_step(
      alg, state.params, state.alg_state, received.messages, received.weights)
  pseudo_grad = zero_personal(pseudo_grad, personal)
  client_states = scatter_states(state.client_states, sampled, results.states,
                                 gathered=isinstance(data, ClientRows))
  broadcast = ServerBroadcast(state.params, state.alg_state, state.round, lr)
  channel_metrics = dict(received.metrics)
  if sampled.left_out is not None:  # Poisson sampling: joined clients past the round's lanes
    channel_metrics["dp/left_out"] = sampled.left_out.astype(jnp.float32)
  metrics = {**training_metrics(results, sampled, spec), **server_metrics, **channel_metrics,
             **traffic_metrics(alg, results.messages, broadcast, sampled, personal,
                               leaf_bytes(channel))}
  return FederatedUpdate(pseudo_grad, alg_state, client_states, received.state, metrics)


def apply_server_step(state: TrainState, pseudo_grad, server_optimizer):
  """``θ_{t+1} = θ_t + server_opt(pseudo_grad)``; SGD(lr=1) gives ``θ̃_{t+1}``."""
  updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state, state.params)
  return optax.apply_updates(state.params, updates), opt_state


def fl_round(state: TrainState, data: ClientData | ClientRows, *, fns: RoundFns,
             spec: FLSpec):
  """One FL round: ``state -> (state, metrics)``. Jit it with ``donate_argnums=0``."""
  update = federated_update(state, data, fns, spec)
  params, opt_state = apply_server_step(state, update.pseudo_grad, fns.server_optimizer)
  new_state = state._replace(
      params=params, opt_state=opt_state, alg_state=update.alg_state,
      client_states=update.client_states, channel_state=update.channel_state,
      round=state.round + 1,
  )
  return new_state, update.metrics


def init_client_states(algorithm: FLAlgorithm, params: Any, data: ClientData,
                       aggregate_adapters: bool, channel: ChannelSpec | None = None) -> dict:
  """The stacked per-client state ``[num_clients, ...]`` for a fresh run.

  ``{"alg": the algorithm's client state, "personal": the leaves that stay on the
  clients, "channel": the client's side of the channel}`` (``personal`` and
  ``channel`` only when there are any), every client's personal leaves starting
  from the initial global ones.
  """
  states = {"alg": jax.vmap(algorithm.init_client_state, in_axes=(None, 0))(params, data)}
  stacked = lambda a: jnp.broadcast_to(a, (data.num_clients, *jnp.shape(a))).copy()
  own = select(params, personal_predicate(algorithm.personal, aggregate_adapters))
  if own:
    states["personal"] = jax.tree.map(stacked, own)
  if channel is not None and channel.compression is not None:
    own_channel = init_client_state(channel, message_shapes(algorithm, params, data))
    if own_channel:
      states["channel"] = jax.tree.map(stacked, own_channel)
  return states


class FederatedRound(NamedTuple):
  """A round built by :func:`make_round`: its pieces, a fresh state, the jitted step."""

  fns: RoundFns
  spec: FLSpec

  def init(self, params: Any, data: ClientData, rng: jax.Array,
           mix_weight: float = 0.0) -> TrainState:
    """Round 0 of a run: the server optimizer's, the algorithm's and every client's state.

    ``rng`` is the run's base key; ``mix_weight`` is the hybrid α_0 (unused in FL).
    """
    algorithm = self.fns.algorithm
    return TrainState(
        params=params, opt_state=self.fns.server_optimizer.init(params),
        alg_state=algorithm.init_server_state(params, data),
        client_states=init_client_states(algorithm, params, data, self.spec.aggregate_adapters,
                                         self.spec.channel),
        rng=rng, round=jnp.zeros((), jnp.int32), mix_weight=jnp.asarray(mix_weight, jnp.float32),
        channel_state=init_server_state(self.spec.channel))

  def step(self, state: TrainState, data: ClientData):
    """One round, unjitted: ``state -> (state, metrics)``."""
    return fl_round(state, data, fns=self.fns, spec=self.spec)

  def jit(self, *, donate: bool = False, **jit_kwargs) -> Callable:
    """The round as one jitted computation; ``donate`` reuses the state's buffers."""
    return jax.jit(functools.partial(fl_round, fns=self.fns, spec=self.spec),
                   donate_argnums=0 if donate else (), **jit_kwargs)


def make_round(algorithm: FLAlgorithm, problem: LocalProblem, spec: FLSpec, *,
               local_optimizer: optax.GradientTransformation,
               local_lr: float | Callable[[jax.Array], jax.Array],
               server_optimizer: optax.GradientTransformation | None = None) -> FederatedRound:
  """A federated round of ``algorithm`` on ``problem``.

  Args:
    algorithm: the federated algorithm (:func:`isr_jax.fl.make_algorithm`).
    problem: what the clients optimise.
    spec: the round's static settings.
    local_optimizer: the clients' optax optimizer (its learning rate injected).
    local_lr: the clients' learning rate η, or ``round -> η_t``.
    server_optimizer: applied to the pseudo-gradient; the algorithm's own
      (FedAvgM, FedAdam) wins; ``None`` and no own: SGD at 1, FedAvg's
      ``θ_{t+1} = θ̃_{t+1}``.

  Returns:
    a :class:`FederatedRound`: ``init(params, data, rng)`` gives round 0's state,
    ``jit()`` the round as one jitted function ``(state, data) -> (state, metrics)``.
  """
  lr_fn = local_lr if callable(local_lr) else (lambda _: local_lr)
  server = algorithm.server_optimizer or server_optimizer or optax.sgd(1.0)
  return FederatedRound(RoundFns(algorithm, problem, local_optimizer, lr_fn, server), spec)
