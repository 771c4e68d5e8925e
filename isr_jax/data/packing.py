"""Client data as dense device arrays: ``[clients, steps, batch, ...]`` plus masks.

Every client is padded to the longest client so that a whole federated round is
one ``vmap`` over clients of one ``scan`` over steps. Padded examples carry
``mask == False``; they never contribute to a loss, and a step whose batch is all
padding leaves the client's state untouched (see :mod:`isr_jax.fl.client`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from isr_jax.errors import ConfigError


class ClientData(NamedTuple):
  """Packed per-client data (a pytree of arrays; leading axis = client).

  Attributes:
    x: inputs ``[C, S, B, *input_shape]``.
    y: labels ``[C, S, B]`` (classification) or ``[C, S, B, H, W]`` (segmentation).
    mask: ``[C, S, B]`` bool, True for real examples. Real examples come first in
      each client's flattened ``S*B`` slots.
    num_examples: ``[C]`` int32, ``|D_n|`` (the FedAvg aggregation weight).
  """

  x: np.ndarray
  y: np.ndarray
  mask: np.ndarray
  num_examples: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.mask.shape[0])

  @property
  def steps_per_epoch(self) -> int:
    """Batches in the longest client's epoch (``S``)."""
    return int(self.mask.shape[1])

  @property
  def batch_size(self) -> int:
    return int(self.mask.shape[2])


def client_sizes(client_indices: Sequence[np.ndarray], batch_size: int,
                 allow_empty: bool = False) -> np.ndarray:
  """``|D_n|`` of every client (int32), after checking the packing's arguments.

  Shared by :func:`pack_clients` and the ragged store
  (:func:`isr_jax.data.ragged.ragged_clients`): the same mistakes, the same lines.
  """
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be a positive integer")
  sizes = np.array([len(ix) for ix in client_indices], np.int32)
  if len(sizes) == 0:
    raise ConfigError("num_clients=0: at least one client is needed")
  empty = np.flatnonzero(sizes == 0)
  if empty.size and not allow_empty:
    raise ConfigError(
        f"client {int(empty[0])} has no examples ({empty.size} empty clients): lower "
        "num_clients or use a partition that gives every client data"
    )
  return sizes


def pack_clients(
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Sequence[np.ndarray],
    batch_size: int,
    *,
    allow_empty: bool = False,
) -> ClientData:
  """Gathers each client's examples into the padded ``[C, S, B, ...]`` layout.

  Args:
    x: all inputs ``[N, ...]``.
    y: all labels ``[N, ...]``.
    client_indices: one index array into ``x``/``y`` per client.
    batch_size: local batch size ``B``.
    allow_empty: accept clients without examples (held-out test splits of
      clients too small to hold one out); training data never allows them.

  Returns:
    A :class:`ClientData` of numpy arrays with ``S = ceil(max_n / B)``.
  """
  sizes = client_sizes(client_indices, batch_size, allow_empty)
  steps = max(int(-(-sizes.max() // batch_size)), 1)
  slots = steps * batch_size
  c = len(client_indices)
  xs = np.zeros((c, slots, *x.shape[1:]), x.dtype)
  ys = np.zeros((c, slots, *y.shape[1:]), y.dtype)
  mask = np.zeros((c, slots), bool)
  for i, ix in enumerate(client_indices):
    ix = np.asarray(ix)
    xs[i, : len(ix)] = x[ix]
    ys[i, : len(ix)] = y[ix]
    mask[i, : len(ix)] = True
  shape = (c, steps, batch_size)
  return ClientData(
      x=xs.reshape(shape + x.shape[1:]),
      y=ys.reshape(shape + y.shape[1:]),
      mask=mask.reshape(shape),
      num_examples=sizes,
  )
