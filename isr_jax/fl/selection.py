"""Which clients train this round, their rows of the data and state, and the order they run in.

A round samples ``clients_per_round`` clients, gathers their rows of the packed
data and of the stacked per-client state, pads their number up to the mesh with
empty clients (id −1), and, after training, scatters the new state back to the
sampled rows. Under DP with Poisson sampling (:mod:`isr_jax.fl.channel.dp`) each
client joins independently instead, into a static number of lanes. Everything
here is a gather or a scatter on the leading client axis, inside the round's one
jit; for a population kept off the device (:mod:`isr_jax.fl.population`) the
ids come from :func:`sample_ids` before the round, which receives the rows
(:class:`ClientRows`) instead of gathering them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.data.packing import ClientData
from isr_jax.fl.channel.accountant import poisson_lanes
from isr_jax.fl.client import resolve_parallelism
from isr_jax.fl.spec import FLSpec
from isr_jax.sharding import padded_count
from isr_jax.state import TrainState


class SampledClients(NamedTuple):
  """The round's clients, in sampling order, padding clients last.

  Attributes:
    ids: client ids ``[K']`` (−1 for the padding clients that fill the mesh).
    real: ``ids >= 0``.
    data: their rows of the packed data; a padding client has no examples.
    states: their rows of the stacked per-client state.
    left_out: clients that joined a Poisson round beyond its lanes (int32
      scalar; ``None`` under fixed-size sampling).
  """

  ids: jax.Array
  real: jax.Array
  data: ClientData
  states: Any
  left_out: jax.Array | None = None


def sample_clients(key: jax.Array, num_clients: int, k: int) -> jax.Array:
  """``k`` distinct client indices, uniformly at random."""
  return jax.random.choice(key, num_clients, (k,), replace=False)


def poisson_sample(key: jax.Array, num_clients: int, rate: float,
                   lanes: int) -> tuple[jax.Array, jax.Array]:
  """Poisson sampling into ``lanes`` lanes: ``(ids [lanes], left_out)``.

  Client ``n`` joins when ``u_n < q`` (``u_n`` uniform, independent). Ordered by
  ``u``, the joined clients come first, in uniformly random order (given that it
  joined, ``u_n / q`` is uniform), and, when more than ``lanes`` join, the lanes
  hold a uniformly random subset of them; unused lanes are padding (id −1).
  """
  u = jax.random.uniform(key, (num_clients,))
  joined = u < rate
  _, order = jax.lax.top_k(-u, lanes)  # the ``lanes`` smallest u, ascending
  ids = jnp.where(joined[order], order, -1).astype(jnp.int32)
  left_out = jnp.maximum(jnp.sum(joined.astype(jnp.int32)) - lanes, 0)
  return ids, left_out


def round_keys(state: TrainState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(sampling, clients, cloud) keys of the current round, derived from ``state.rng``."""
  key = jax.random.fold_in(state.rng, state.round)
  return tuple(jax.random.split(key, 3))  # type: ignore[return-value]


def take_rows(tree, rows: jax.Array):
  """Rows ``rows`` of every leaf's leading axis."""
  return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), tree)


class ClientRows(NamedTuple):
  """The round's clients sampled and gathered outside the jit (:mod:`isr_jax.fl.population`).

  Given to the round in place of the population's :class:`ClientData`, with
  ``TrainState.client_states`` holding the same rows: the round then trains
  exactly these clients, and its ``client_states`` come back as their new rows.

  Attributes:
    ids: client ids ``[K']`` from :func:`sample_ids` (−1 for padding).
    data: their packed rows ``[K', S, B, ...]`` (a padding row is ignored).
    left_out: as in :class:`SampledClients`.
  """

  ids: jax.Array
  data: ClientData
  left_out: jax.Array | None = None


def sample_ids(key: jax.Array, num_clients: int,
               spec: FLSpec) -> tuple[jax.Array, jax.Array | None]:
  """The round's client ids ``[K']``, padded to the mesh with −1, and ``left_out``.

  ``K`` clients uniformly without replacement, or under DP with Poisson sampling
  :func:`~isr_jax.fl.channel.accountant.poisson_lanes` lanes (:func:`poisson_sample`);
  ``left_out`` is ``None`` under fixed-size sampling.
  """
  dp = spec.channel.dp
  left_out = None
  if dp is not None and dp.sampling == "poisson":
    k = poisson_lanes(num_clients, dp.sampling_rate)
    sampled, left_out = poisson_sample(key, num_clients, dp.sampling_rate, k)
  else:
    k = spec.clients_per_round
    sampled = sample_clients(key, num_clients, k)
  ids = jnp.concatenate([sampled, -jnp.ones(padded_count(k, spec.mesh) - k, sampled.dtype)])
  return ids, left_out


def select_clients(key: jax.Array, data: ClientData | ClientRows, client_states: Any,
                   spec: FLSpec) -> SampledClients:
  """Samples the round's clients and gathers their data and state.

  Padding clients (id −1) fill the mesh: they read row 0, have no examples and
  weight 0, and are never written back (:func:`scatter_states`). ``data`` may be
  :class:`ClientRows`, the rows gathered before the round (with ``client_states``
  their rows): then nothing is sampled or gathered here.
  """
  if isinstance(data, ClientRows):
    ids, left_out, client_data, states = data.ids, data.left_out, data.data, client_states
  else:
    ids, left_out = sample_ids(key, spec.num_clients or data.num_clients, spec)
    rows = jnp.where(ids >= 0, ids, 0)
    client_data, states = take_rows(data, rows), take_rows(client_states, rows)
  real = ids >= 0
  client_data = client_data._replace(
      mask=client_data.mask & real[:, None, None],
      num_examples=jnp.where(real, client_data.num_examples, 0))
  return SampledClients(ids, real, client_data, states, left_out)


def scatter_states(client_states: Any, sampled: SampledClients, new_states: Any,
                   gathered: bool = False) -> Any:
  """``client_states`` with the sampled clients' rows replaced by ``new_states``.

  ``gathered``: ``client_states`` are the sampled rows themselves (:class:`ClientRows`):
  each real row becomes its new state, a padding row stays as it was.
  """

  def scatter(full, new):
    if gathered:
      return jnp.where(sampled.real.reshape((-1,) + (1,) * (new.ndim - 1)), new, full)
    rows = jnp.where(sampled.real, sampled.ids, full.shape[0])  # out of range: dropped
    return full.at[rows].set(new, mode="drop")

  return jax.tree.map(scatter, client_states, new_states)


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
