"""A population whose cost is what each round samples: data and client state off the device.

The dense path holds every client on the device: data packed to the largest
client (``[N, S, B, ...]``) and ``TrainState.client_states`` stacked
``[N, ...]``, so memory grows as population × largest client and population ×
personal state. Here the population lives on the host instead:

* its examples once, in a :class:`~isr_jax.data.ragged.RaggedClients` store
  (memory ∝ Σ examples);
* its per-client state in a :class:`~isr_jax.fl.state_store.ClientStateStore`
  (host memory, or versioned files on disk when it does not fit), every row
  starting from :func:`initial_rows` the first time it is read.

Each round the host samples the round's ids with the round's own key
(:func:`~isr_jax.fl.selection.sample_ids`, the function the dense round calls
inside its jit), gathers the sampled clients' data and state rows, runs the
same jitted round on them (:class:`~isr_jax.fl.selection.ClientRows`), and
scatters their new rows back. The device holds K' clients whatever N is, and the
round is the dense round's computation on the same rows: the same numbers.

While a round runs on the device (JAX dispatches asynchronously), the host
samples the next round and gathers the rows that round needs and this one does
not write, so reading the store overlaps the computation; a client in both
rounds is read after this round's rows are written back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from isr_jax.data.packing import ClientData
from isr_jax.data.ragged import RaggedClients, gather_rows
from isr_jax.errors import ConfigError
from isr_jax.fl.evaluate_clients import client_accuracy_stats
from isr_jax.fl.round import FederatedRound, init_client_states
from isr_jax.fl.selection import ClientRows, sample_ids
from isr_jax.fl.spec import FLSpec
from isr_jax.state import TrainState


def round_sampler(spec: FLSpec, num_clients: int) -> Callable[[jax.Array, int], tuple]:
  """``(rng, round) -> (ids [K'], left_out)`` as numpy, from the round's sampling key.

  The key is :func:`~isr_jax.fl.selection.round_keys`'s first, so the ids are those
  the dense round would sample inside its jit.
  """
  if num_clients < 1:
    raise ConfigError(f"fl.num_clients={num_clients}: a population needs at least one client")

  @jax.jit
  def sample(rng, round_):
    key = jax.random.split(jax.random.fold_in(rng, round_), 3)[0]
    return sample_ids(key, num_clients, spec)

  # On the host's CPU whatever the accelerator: the next round's ids are drawn while
  # the accelerator runs this round (a permutation of N: 35 ms at N = 100,000).
  cpu = jax.local_devices(backend="cpu")[0]

  def host(rng, round_):
    args = jax.device_put((np.asarray(rng), np.int32(round_)), cpu)
    ids, left_out = jax.device_get(sample(*args))
    return np.asarray(ids, np.int64), left_out

  return host


def initial_rows(federated: FederatedRound, params: Any, data: RaggedClients,
                 chunk: int = 256) -> Callable[[np.ndarray], Any]:
  """``ids -> rows``: each client's state before it first trains, as numpy.

  What :func:`~isr_jax.fl.round.init_client_states` gives those clients in the
  dense path (their algorithm state from their own data, the initial personal
  leaves), computed for the requested rows only, ``chunk`` clients at a time
  (one compiled shape; the packed rows of ``chunk`` clients at most in memory).
  """
  algorithm, spec = federated.fns.algorithm, federated.spec
  # A host copy, passed in: a round that donates its state frees the device one, and
  # a closed-over tree would be compiled in as constants.
  params = jax.device_get(params)

  @jax.jit
  def rows_of(params, client_data: ClientData):
    return init_client_states(algorithm, params, client_data, spec.aggregate_adapters,
                              spec.channel)

  def init(ids: np.ndarray):
    ids = np.maximum(np.asarray(ids, np.int64), 0)
    size = min(chunk, max(len(ids), 1))
    parts = []
    for start in range(0, max(len(ids), 1), size):
      part = ids[start:start + size]
      padded = np.concatenate([part, np.zeros(size - len(part), np.int64)])
      rows = jax.device_get(rows_of(params, gather_rows(data, padded)))
      n = len(part)
      parts.append(jax.tree.map(lambda a, n=n: a[:n], rows))
    return jax.tree.map(lambda *p: np.concatenate(p), *parts)

  return init


def server_init_data(data: RaggedClients) -> ClientData:
  """The whole population as ONE packed client, for ``init_server_state``.

  Algorithms that start from population statistics (FedIR's label
  distribution, FedGAU's pixel moments) sum over real examples, which one
  client holding every example gives without packing N clients to the largest;
  the others read only shapes. Memory ∝ Σ examples.
  """
  b = data.batch_size
  n = int(data.x.shape[0])
  steps = max(-(-n // b), 1)
  pad = steps * b - n
  fill = lambda a: np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
  mask = np.arange(steps * b) < n
  return ClientData(x=fill(data.x).reshape(1, steps, b, *data.x.shape[1:]),
                    y=fill(data.y).reshape(1, steps, b, *data.y.shape[1:]),
                    mask=mask.reshape(1, steps, b), num_examples=np.array([n], np.int32))


class _Prefetched(NamedTuple):
  round: int
  ids: np.ndarray
  left_out: Any
  data: ClientData
  states: dict[int, Any]  # row position -> its state row, for the clients read early


def _row(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def _stack(rows: list):
  return jax.tree.map(lambda *r: np.stack(r), *rows)


class PopulationRound:
  """One federated round over a host-held population: ``state -> (state, metrics)``.

  ``state.client_states`` stays ``{}`` between rounds (the store holds them).

  Args:
    round_fn: the jitted round ``(state, ClientRows) -> (state, metrics)``
      (``FederatedRound.jit()``, or the hybrid round).
    spec: the round's settings (``spec.num_clients`` is the population).
    data: the population's examples.
    store: the population's client state (``gather`` / ``scatter``).
    put: places the round's rows on the devices (default ``jax.device_put``;
      ``isr_jax.sharding.put_clients`` on a mesh).
    extra_data: further arguments of ``round_fn`` after the rows (the hybrid
      cloud's data).
  """

  def __init__(self, round_fn: Callable, spec: FLSpec, data: RaggedClients, store,
               *, put: Callable = jax.device_put, extra_data: tuple = ()):
    num_clients = spec.num_clients or data.num_clients
    if num_clients > data.num_clients:
      raise ConfigError(f"fl.num_clients={num_clients} is more than the {data.num_clients} "
                        "clients the data was partitioned into")
    self.round_fn, self.spec, self.data, self.store = round_fn, spec, data, store
    self.put, self.extra_data = put, extra_data
    self.sample = round_sampler(spec, num_clients)
    self._next: _Prefetched | None = None

  def gather_data(self, ids: np.ndarray) -> ClientData:
    """The packed rows of clients ``ids`` (−1: padding)."""
    return gather_rows(self.data, ids)

  def _gather(self, rng, round_: int, skip: frozenset[int] = frozenset()) -> _Prefetched:
    ids, left_out = self.sample(rng, round_)
    early = [i for i, c in enumerate(ids.tolist()) if c < 0 or c not in skip]
    read = self.store.gather(ids[early]) if early else None
    states = {i: _row(read, j) for j, i in enumerate(early)}
    return _Prefetched(round_, ids, left_out, gather_rows(self.data, ids), states)

  def __call__(self, state: TrainState) -> tuple[TrainState, dict]:
    r = int(state.round)
    # A host copy: the round may donate the state's buffers, and sampling the next
    # round from its output key would wait for the round to finish.
    rng = np.asarray(jax.device_get(state.rng))
    rows = self._next if self._next is not None and self._next.round == r else None
    if rows is None:
      rows = self._gather(rng, r)
    late = [i for i in range(len(rows.ids)) if i not in rows.states]
    if late:  # trained last round after they were read ahead: read them now
      read = self.store.gather(rows.ids[late])
      rows.states.update({i: _row(read, j) for j, i in enumerate(late)})
    states = _stack([rows.states[i] for i in range(len(rows.ids))])
    batch = ClientRows(rows.ids, rows.data, rows.left_out)
    new_state, metrics = self.round_fn(
        state._replace(client_states=self.put(states)), self.put(batch), *self.extra_data)
    # The device is busy with this round: read the next one's rows meanwhile, all but
    # the clients this round writes back.
    self._next = self._gather(rng, r + 1, skip=frozenset(rows.ids.tolist()) - {-1})
    self.store.scatter(rows.ids, jax.device_get(new_state.client_states), step=r + 1)
    return new_state._replace(client_states={}), metrics


def evaluate_population(client_eval_fn: Callable, state: TrainState, train: RaggedClients,
                        test: RaggedClients, store, *, chunk: int, num_clients: int,
                        put: Callable = jax.device_put,
                        multiple: int = 1) -> dict[str, np.ndarray]:
  """Personalized evaluation of every client, ``chunk`` clients at a time.

  ``client_eval_fn(state, train_rows, test_rows, ids)`` is the jitted
  :func:`~isr_jax.fl.evaluate_clients.evaluate_clients` on a chunk (its state's
  ``client_states`` the chunk's rows, ``ids`` their global ids, −1 for the last
  chunk's padding). The per-client vectors are joined in client order and
  summarised by the same :func:`~isr_jax.fl.evaluate_clients.client_accuracy_stats`
  as the dense evaluation: the same numbers, with memory for ``chunk`` clients.
  ``multiple``: the chunk's width is rounded up to a multiple of it (the devices
  ``put`` splits the clients over).
  """
  if chunk < 1:
    raise ConfigError(f"fl.population.eval_chunk={chunk} must be a positive integer")
  # No wider than the population (no chunk of mostly padding), a multiple of the
  # devices the chunk is split over.
  chunk = -(-min(chunk, num_clients) // multiple) * multiple
  correct, count = [], []
  for start in range(0, num_clients, chunk):
    ids = np.arange(start, start + chunk)
    ids = np.where(ids < num_clients, ids, -1)
    rows = store.gather(ids)
    out = client_eval_fn(state._replace(client_states=put(rows)),
                         put(gather_rows(train, ids)), put(gather_rows(test, ids)), put(ids))
    out = jax.device_get(out)
    real = ids >= 0
    correct.append(np.asarray(out["client_correct"])[real])
    count.append(np.asarray(out["client_examples"])[real])
  correct, count = np.concatenate(correct), np.concatenate(count)
  stats = jax.device_get(jax.jit(client_accuracy_stats)(correct, count))
  return {**stats, "client_correct": correct, "client_examples": count}
