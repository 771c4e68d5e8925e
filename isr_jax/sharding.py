"""Placing clients on devices: a 1-D ``Mesh`` with a ``clients`` axis.

Every client-indexed array — all clients' packed data and their persistent
state — is a global ``jax.Array`` sharded ``P("clients")`` over the mesh; the
server's parameters and optimizer state are replicated. Inside the round the
sampled clients (padded to a multiple of the device count with empty,
zero-weight clients) are again sharded ``P("clients")`` and each device runs its
share under ``jax.shard_map``; the server's weighted sum over clients is a
cross-device reduction that XLA inserts. On several hosts (``jax.distributed``)
each process supplies only the rows of the clients its devices hold
(:func:`put_clients`), so no process needs every client's data on device.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from isr_jax.data.packing import ClientData
from isr_jax.errors import ConfigError

CLIENT_AXIS = "clients"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (all by default).

  Raises:
    ConfigError: ``num_devices`` is not between 1 and the number of devices.
  """
  devices = jax.devices()
  n = len(devices) if num_devices is None else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ConfigError(f"fl.num_devices={num_devices} must be in [1, {len(devices)}] (0 = every "
                      f"device; this process sees {len(devices)} {devices[0].platform} devices)")
  return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,))


def clients_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(CLIENT_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def padded_count(count: int, mesh: Mesh | None) -> int:
  """``count`` rounded up to a multiple of the mesh size (1 without a mesh)."""
  size = 1 if mesh is None else mesh.size
  return math.ceil(count / size) * size


def pad_clients(data: ClientData, count: int) -> ClientData:
  """Appends empty clients (no examples, mask False) up to ``count`` clients."""
  extra = count - data.num_clients
  if extra <= 0:
    return data
  pad = lambda a: np.concatenate([a, np.zeros((extra, *a.shape[1:]), a.dtype)])
  return ClientData(*(pad(np.asarray(a)) for a in data))


def _process_rows(num_rows: int, mesh: Mesh) -> slice:
  """The contiguous rows of a ``P("clients")`` array held by this process's devices."""
  per_device = num_rows // mesh.size
  mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
  return slice(mine[0] * per_device, (mine[-1] + 1) * per_device)


def put_clients(tree: Any, mesh: Mesh) -> Any:
  """Global arrays sharded over clients, each process giving only its rows.

  Every leaf has a leading client axis divisible by the mesh size (see
  :func:`pad_clients`).
  """
  sharding = clients_sharding(mesh)

  def put(a):
    a = np.asarray(a)
    local = a[_process_rows(a.shape[0], mesh)]
    return jax.make_array_from_process_local_data(sharding, local, a.shape)

  return jax.tree.map(put, tree)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Global arrays replicated on every device of ``mesh``."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)
