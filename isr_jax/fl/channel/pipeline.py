"""The three places a round calls the channel: before the clients train, as each client
sends, and as the server receives.

- :func:`prepare` — the sampled clients that drop out become padding (no work,
  no weight, no state change, no traffic); each remaining client gets its share
  of local work and whether it attacks; attackers that flip labels get their
  labels flipped.
- :func:`send` — inside the client map, a client compresses its message (with
  its error-feedback residual).
- :func:`receive` — on the stacked messages: attackers' messages are replaced,
  then DP or a robust rule turns the messages into one estimate of the mean,
  which the algorithm's server rule reads as its only message (weight 1).

The channel's randomness comes from its own stream of the round key
(:func:`channel_keys`), so switching a part on never changes which clients are
sampled or how they shuffle, and with every part off the round is unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.fl.algorithm import ServerBroadcast
from isr_jax.fl.channel import attacks, compression, dp, robust, stragglers
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.selection import SampledClients

# fold_in constant of the channel's keys: a stream of the round key that no other
# part of the round uses.
_CHANNEL_STREAM = 0x4348414E


class Lanes(NamedTuple):
  """What the channel decided for each sampled client, in sampling order.

  Attributes:
    work: ``[K]`` the fraction of its local steps the client runs (1: all).
    attacker: ``[K]`` the client is malicious this round.
  """

  work: jax.Array
  attacker: jax.Array


class ChannelKeys(NamedTuple):
  """The round's channel keys: who drops out or attacks, each client's compressor, the
  server's noise."""

  lanes: jax.Array
  send: jax.Array
  receive: jax.Array


def channel_keys(rng: jax.Array, round_index: jax.Array) -> ChannelKeys:
  """The channel's keys for round ``round_index`` of a run with base key ``rng``."""
  key = jax.random.fold_in(jax.random.fold_in(rng, round_index), _CHANNEL_STREAM)
  return ChannelKeys(*jax.random.split(key, 3))


def prepare(key: jax.Array, sampled: SampledClients,
            channel: ChannelSpec) -> tuple[SampledClients, Lanes]:
  """Dropouts, stragglers' work and attackers for the round's sampled clients."""
  k = sampled.real.shape[0]
  work = jnp.ones((k,), jnp.float32)
  attacker = jnp.zeros((k,), bool)
  if channel.stragglers is not None:
    stays, work = stragglers.draw(key, sampled.real, channel.stragglers)
    data = sampled.data
    sampled = sampled._replace(
        real=stays,
        data=data._replace(mask=data.mask & stays[:, None, None],
                           num_examples=jnp.where(stays, data.num_examples, 0)))
  if channel.attack is not None:
    attacker = attacks.attackers(sampled.real, channel.attack)
    if channel.attack.kind == "label_flip":
      sampled = sampled._replace(
          data=attacks.flip_labels(sampled.data, attacker, channel.attack))
  return sampled, Lanes(work, attacker)


def send(key: jax.Array, message: Any, channel_state: dict,
         channel: ChannelSpec) -> tuple[Any, dict]:
  """One client's message as the server decodes it, and the client's new channel state."""
  if channel.compression is None:
    return message, channel_state
  sent, residual = compression.compress(key, message, channel_state.get("residual"),
                                        channel.compression)
  return sent, ({**channel_state, "residual": residual} if "residual" in channel_state
                else channel_state)


class Received(NamedTuple):
  """What the server's rule reads, the channel's new server state, and its metrics."""

  messages: Any
  weights: jax.Array
  state: dict
  metrics: dict


def receive(key: jax.Array, messages: Any, weights: jax.Array, real: jax.Array, lanes: Lanes,
            state: dict, channel: ChannelSpec) -> Received:
  """The stacked messages as the algorithm's server rule reads them.

  Attackers' messages are replaced first; then DP (clip, sum, noise) or a
  robust rule gives one estimate of the mean message, handed on as ``[1, ...]``
  with weight 1 (what an algorithm with ``mean_messages`` reads). Without DP or
  a rule the messages go on as they are.
  """
  metrics: dict[str, jax.Array] = {}
  k_attack, k_dp = jax.random.split(key)
  if channel.attack is not None:
    attacking = lanes.attacker & real
    messages = attacks.corrupt(k_attack, messages, attacking, real, channel.attack)
    metrics["attack/attackers"] = jnp.sum(attacking.astype(jnp.float32))
  if channel.dp is not None:
    mean, dp_state, estimate_metrics = dp.privatize(k_dp, messages, real, state["dp"],
                                                    channel.dp)
    state = {**state, "dp": dp_state}
  elif channel.robust is not None:
    mean, estimate_metrics = robust.aggregate(messages, weights, real, channel.robust)
  else:
    return Received(messages, weights, state, metrics)
  one = jax.tree.map(lambda m: m[None], mean)
  return Received(one, jnp.ones((1,), jnp.float32), state, {**metrics, **estimate_metrics})


def init_server_state(channel: ChannelSpec) -> dict:
  """The channel's server state for round 0 (``{}`` when no part keeps one)."""
  return {} if channel.dp is None else {"dp": dp.init_state(channel.dp)}


def init_client_state(channel: ChannelSpec, message_shapes: Any) -> dict:
  """One client's channel state for round 0: the error-feedback residual, zeros shaped
  like its message, when the compressor keeps one (else ``{}``)."""
  if channel.compression is None or not channel.compression.error_feedback:
    return {}
  return {"residual": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), message_shapes)}


def leaf_bytes(channel: ChannelSpec):
  """``ShapeDtypeStruct -> bytes`` one message leaf takes on the uplink."""
  if channel.compression is None:
    return lambda s: s.size * s.dtype.itemsize
  return lambda s: compression.leaf_bytes(s, channel.compression)


def message_shapes(algorithm, params: Any, data) -> Any:
  """The shapes of one client's message (``ShapeDtypeStruct`` leaves), from client 0's row.

  Traced only (:func:`jax.eval_shape`), so it costs no training.
  """
  def one_message():
    row = jax.tree.map(lambda a: a[0], data)
    client_state = algorithm.init_client_state(params, row)
    alg_state = algorithm.init_server_state(params, data)
    plan = None
    if algorithm.plan_round is not None:
      stacked = jax.tree.map(lambda a: a[None], client_state)
      plan = jax.tree.map(lambda a: a[0], algorithm.plan_round(
          alg_state, stacked, jnp.zeros((1,), jnp.int32)))
    broadcast = ServerBroadcast(params, alg_state, jnp.zeros((), jnp.int32),
                                jnp.zeros((), jnp.float32), plan)
    ctx = algorithm.client_init(broadcast, client_state, row)
    message, _ = algorithm.client_final(broadcast, ctx, params, jnp.ones((), jnp.int32),
                                        client_state)
    return message

  return jax.eval_shape(one_message)
