"""The sampled clients through the client map, and what the server makes of their messages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.client import map_clients
from isr_jax.fl.selection import SampledClients, size_balanced_order, take_rows
from isr_jax.fl.spec import FLSpec


class ClientResults(NamedTuple):
  """What the sampled clients returned, in sampling order.

  Attributes:
    messages: the messages stacked over the clients, or, for an algorithm with
      ``mean_messages``, their example-weighted mean as one message ``[1, ...]``.
    message_weights: the weights ``server_update`` reads with ``messages``:
      ``n_i / Σ n`` (zero for padding clients), or ``[1]`` for the mean.
    weights: ``n_i / Σ n`` for every sampled client.
    states: the clients' new per-client state.
    aux_sum: per-term loss sums over each client's steps.
    num_steps: local steps each client ran.
    drift: ``‖θ_i − θ_t‖²`` of each client's model.
    grads: ``∇L_T^n(θ_t)`` per client when the round measures heterogeneity.
  """

  messages: Any
  message_weights: jax.Array
  weights: jax.Array
  states: Any
  aux_sum: dict
  num_steps: jax.Array
  drift: jax.Array
  grads: Any


def run_clients(one_client: Callable, sampled: SampledClients, plans: Any, lanes: Any,
                shared: tuple, spec: FLSpec, mean_messages: bool) -> ClientResults:
  """``one_client`` for every sampled client under the client map.

  Each client gets its rows of the data, its state, its id, its plan and its
  channel lane (:class:`isr_jax.fl.channel.pipeline.Lanes`), and ``shared``.

  Lanes that run side by side (a vmapped chunk, a device's share) cost their
  largest client, so they are filled with clients of similar size
  (:func:`size_balanced_order`); the results are put back in sampling order
  before anything is aggregated.
  """
  order = size_balanced_order(sampled.data.num_examples, spec)
  outputs = map_clients(
      one_client, take_rows((sampled.data, sampled.states, sampled.ids, plans, lanes), order),
      shared,
      strategy=spec.parallelism, chunk_size=spec.chunk_size, mesh=spec.mesh,
      summed=mean_messages)
  inverse = jnp.argsort(order)
  n = sampled.data.num_examples.astype(jnp.float32)
  total_examples = jnp.maximum(jnp.sum(n), 1.0)
  weights = n / total_examples
  if mean_messages:
    outputs, summed = outputs
    # Σ_i n_i m_i / Σ_i n_i = Σ_i w_i m_i: the one message the rule reads, weight 1.
    messages = jax.tree.map(lambda s: (s / total_examples.astype(s.dtype))[None], summed)
    message_weights = jnp.ones((1,), jnp.float32)
    states, aux_sum, num_steps, drift, grads = take_rows(outputs, inverse)
  else:
    messages, states, aux_sum, num_steps, drift, grads = take_rows(outputs, inverse)
    message_weights = weights
  return ClientResults(messages, message_weights, weights, states, aux_sum, num_steps, drift,
                       grads)


def server_step(algorithm: FLAlgorithm, params: Any, alg_state: Any, messages: Any,
                weights: jax.Array) -> tuple[Any, Any, dict[str, jax.Array]]:
  """``algorithm.server_update``, with the metrics it may return as a third element.

  Returns:
    ``(pseudo_grad, alg_state, metrics)``; ``metrics`` (``{}`` when the rule
    returns none) are reported under ``server/<name>``.
  """
  pseudo_grad, new_alg_state, *rest = algorithm.server_update(params, alg_state, messages,
                                                              weights)
  metrics = rest[0] if rest else {}
  return pseudo_grad, new_alg_state, {f"server/{k}": v for k, v in metrics.items()}
