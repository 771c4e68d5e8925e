"""Client data stored ragged on the host: every example once, plus per-client offsets.

:func:`~isr_jax.data.packing.pack_clients` pads every client to the largest one,
so its memory grows as clients x largest client; with a power-law population of
thousands of clients that is mostly padding. :class:`RaggedClients` keeps each
example once, and :func:`gather_rows` builds the dense ``[K, S, B, ...]`` rows of
only the clients a round samples, bit-identical to the rows ``pack_clients``
would have made, so the device side of a round does not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from isr_jax.data.packing import ClientData, client_sizes
from isr_jax.errors import ConfigError

PADDING_ID = -1
"""A client id that :func:`gather_rows` turns into an empty client (no examples)."""


class RaggedClients(NamedTuple):
  """Every client's examples concatenated, with offsets (host numpy arrays).

  Attributes:
    x: inputs ``[sum_n, *input_shape]``, client by client in client order, each
      client's examples in the order of its index list.
    y: labels ``[sum_n, ...]``, in the same order as ``x``.
    offsets: int64 ``[C + 1]``; client ``c`` owns ``x[offsets[c]:offsets[c + 1]]``.
    batch_size: local batch size ``B``.
    steps_per_epoch: ``S = max(ceil(max_n / B), 1)``, the ``S`` that
      ``pack_clients`` uses for the same clients, so gathered rows have its shape.
  """

  x: np.ndarray
  y: np.ndarray
  offsets: np.ndarray
  batch_size: int
  steps_per_epoch: int

  @property
  def num_clients(self) -> int:
    return int(self.offsets.shape[0] - 1)

  @property
  def num_examples(self) -> np.ndarray:
    """``[C]`` int32 ``|D_n|``, as in :attr:`ClientData.num_examples`."""
    return np.diff(self.offsets).astype(np.int32)

  @property
  def nbytes(self) -> int:
    """Bytes this store holds (``x``, ``y`` and ``offsets``)."""
    return int(self.x.nbytes + self.y.nbytes + self.offsets.nbytes)

  @property
  def dense_nbytes(self) -> int:
    """Bytes ``pack_clients`` of the same clients would hold, computed without packing.

    ``C*S*B`` slots of one example's ``x`` and ``y`` bytes plus a one-byte mask,
    and four bytes of ``num_examples`` per client.
    """
    slots = self.num_clients * self.steps_per_epoch * self.batch_size
    per_slot = _example_nbytes(self.x) + _example_nbytes(self.y) + 1
    return int(slots * per_slot + 4 * self.num_clients)


def _example_nbytes(a: np.ndarray) -> int:
  """Bytes of one example (one row along the leading axis) of ``a``."""
  return int(a.dtype.itemsize * math.prod(a.shape[1:]))


def _steps(max_size: int, batch_size: int) -> int:
  """``S``: batches in the longest client's epoch, at least one."""
  return max(-(-int(max_size) // batch_size), 1)


def _as_index(ix: np.ndarray) -> np.ndarray:
  """One client's index list as an array; an empty list as an empty *integer* array.

  ``np.asarray([])`` is float64, and one float array would turn the whole
  concatenation into floats that numpy refuses as indices.
  """
  ix = np.asarray(ix)
  return ix if ix.size else np.empty(0, np.intp)


def ragged_clients(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    batch_size: int,
    *,
    allow_empty: bool = False,
) -> RaggedClients:
  """Stores each client's examples once, concatenated in client order.

  Takes the arguments of :func:`~isr_jax.data.packing.pack_clients` and raises
  the same errors; ``gather_rows(store, ids)`` then equals
  ``pack_clients(x, y, client_indices, batch_size)[ids]`` bit for bit. Where the
  clients already hold ``x``'s examples in order, the store shares ``x`` and ``y``.

  Args:
    x: all inputs ``[N, ...]``.
    y: all labels ``[N, ...]``.
    client_indices: one index array into ``x``/``y`` per client.
    batch_size: local batch size ``B``.
    allow_empty: accept clients without examples (held-out test splits).

  Returns:
    A :class:`RaggedClients` holding ``sum_n`` examples.

  Raises:
    ConfigError: ``batch_size < 1``, no clients, or an empty client without
      ``allow_empty``.
  """
  sizes = client_sizes(client_indices, batch_size, allow_empty)
  index = np.concatenate([_as_index(ix) for ix in client_indices])
  offsets = np.zeros(len(sizes) + 1, np.int64)
  np.cumsum(sizes, out=offsets[1:])
  x, y = np.asarray(x), np.asarray(y)
  # Already client after client: the arrays themselves, not a second copy.
  if not (len(index) == len(x) and np.array_equal(index, np.arange(len(x)))):
    x, y = x[index], y[index]
  return RaggedClients(
      x=x,
      y=y,
      offsets=offsets,
      batch_size=int(batch_size),
      steps_per_epoch=_steps(sizes.max(), batch_size),
  )


def _checked_ids(store: RaggedClients, ids: np.ndarray) -> np.ndarray:
  """``ids`` as a 1-D int64 array of valid client ids or :data:`PADDING_ID`."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
    raise ConfigError(
        f"ids: shape {ids.shape} dtype {ids.dtype}; must be a 1-D integer array of client ids"
    )
  ids = ids.astype(np.int64)
  bad = (ids < PADDING_ID) | (ids >= store.num_clients)
  if bad.any():
    raise ConfigError(
        f"ids: client id {int(ids[bad][0])} out of range; allowed are 0.."
        f"{store.num_clients - 1} and {PADDING_ID} (an empty padding client)"
    )
  return ids


def gather_rows(store: RaggedClients, ids: np.ndarray) -> ClientData:
  """Packs the clients ``ids`` into ``pack_clients``' dense layout.

  Only the sampled clients' examples are touched: the work and the temporaries
  scale with the returned rows, never with the population, so a round of a
  100,000-client store costs what a round of its ``len(ids)`` clients costs.

  Args:
    store: the ragged clients.
    ids: 1-D integer client ids, in any order; :data:`PADDING_ID` (``-1``) gives
      an empty client (all-zero ``x``/``y``, mask all False, ``num_examples`` 0)
      that pads a round to a fixed number of clients.

  Returns:
    A :class:`ClientData` of numpy arrays ``[len(ids), S, B, ...]`` with
    ``S = store.steps_per_epoch``, equal bit for bit to ``pack_clients`` rows.

  Raises:
    ConfigError: ``ids`` is not 1-D integer, or holds an id outside
      ``[-1, num_clients)``.
  """
  ids = _checked_ids(store, ids)
  real = ids != PADDING_ID
  safe = np.where(real, ids, 0)
  starts = store.offsets[safe]
  sizes = np.where(real, store.offsets[safe + 1] - starts, 0)
  steps, batch = store.steps_per_epoch, store.batch_size
  # Real examples fill the first sizes[k] slots of row k, so the row-major order
  # of the destination mask is exactly the order of the concatenated source runs.
  dest = np.arange(steps * batch) < sizes[:, None]
  # Source index of the j-th gathered example: its run's start plus its rank in
  # the run, i.e. j shifted by (start - where the run begins in the gather).
  run_begins = np.cumsum(sizes) - sizes
  src = np.arange(int(sizes.sum()), dtype=np.int64) + np.repeat(starts - run_begins, sizes)
  k = len(ids)
  xs = np.zeros((k, steps * batch, *store.x.shape[1:]), store.x.dtype)
  ys = np.zeros((k, steps * batch, *store.y.shape[1:]), store.y.dtype)
  xs[dest] = store.x[src]
  ys[dest] = store.y[src]
  shape = (k, steps, batch)
  return ClientData(
      x=xs.reshape(shape + store.x.shape[1:]),
      y=ys.reshape(shape + store.y.shape[1:]),
      mask=dest.reshape(shape),
      num_examples=sizes.astype(np.int32),
  )


def pack_from_ragged(store: RaggedClients) -> ClientData:
  """Every client in the dense layout, for code that still wants ``pack_clients``' output."""
  return gather_rows(store, np.arange(store.num_clients))


def as_ragged(data: ClientData) -> RaggedClients:
  """Converts dense :class:`ClientData` to the ragged store, dropping the padding.

  Args:
    data: dense client data (numpy or device arrays) whose real examples come
      first in each client's flattened ``S*B`` slots, as ``pack_clients`` writes.

  Returns:
    A :class:`RaggedClients` with the same ``B`` and ``S`` as ``data``, so that
    :func:`gather_rows` gives back ``data``'s rows.

  Raises:
    ConfigError: ``data.mask`` does not mark exactly the first
      ``num_examples`` slots of each client.
  """
  mask = np.asarray(data.mask)
  c, steps, batch = mask.shape
  sizes = np.asarray(data.num_examples).astype(np.int64)
  flat_mask = mask.reshape(c, steps * batch)
  if not np.array_equal(flat_mask, np.arange(steps * batch) < sizes[:, None]):
    raise ConfigError(
        "data.mask must mark exactly the first num_examples slots of each client "
        "(the layout pack_clients writes)"
    )
  x = np.asarray(data.x)
  y = np.asarray(data.y)
  offsets = np.zeros(c + 1, np.int64)
  np.cumsum(sizes, out=offsets[1:])
  return RaggedClients(
      x=x.reshape(c, steps * batch, *x.shape[3:])[flat_mask],
      y=y.reshape(c, steps * batch, *y.shape[3:])[flat_mask],
      offsets=offsets,
      batch_size=int(batch),
      steps_per_epoch=int(steps),
  )
