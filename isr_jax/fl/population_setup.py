"""A run's population off the device: what :func:`isr_jax.experiment.build_experiment`
builds for ``fl.population.placement`` ``host`` / ``file``, and what the training loop
opens and calls (:mod:`isr_jax.train`).

The placement is chosen here from sizes known before anything is packed: the
dense layout's bytes (every client's data padded to the largest, train and
held-out splits, plus the stacked client state) against
``fl.population.dense_limit_gib`` (:func:`isr_jax.fl.placement.resolve`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from isr_jax import checkpoint
from isr_jax.data.packing import ClientData, client_sizes, pack_clients
from isr_jax.data.ragged import RaggedClients
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import tree_bytes
from isr_jax.fl.file_store import FileStateStore
from isr_jax.fl.placement import (
    METADATA_KEY,
    STATE_DIR,
    PopulationSettings,
    placement_for_resume,
    resolve,
)
from isr_jax.fl.population import PopulationRound, evaluate_population
from isr_jax.fl.round import FederatedRound, init_client_states
from isr_jax.fl.selection import ClientRows
from isr_jax.sharding import put_clients, put_replicated
from isr_jax.state import TrainState


class PopulationSetup(NamedTuple):
  """The population of a run whose clients live on the host.

  Attributes:
    placement: ``"host"`` or ``"file"``.
    settings: ``fl.population``.
    train: every client's training examples.
    test: every client's held-out split (``None`` without personalized evaluation).
    init_rows: ``ids -> rows``, a client's state before it first trains.
    row_template: one client's state row (``jax.ShapeDtypeStruct`` leaves).
    put: host rows (:class:`~isr_jax.fl.selection.ClientRows`, state rows, ids)
      onto the devices, split over the mesh's clients.
    devices: how many devices ``put`` splits the clients over.
  """

  placement: str
  settings: PopulationSettings
  train: RaggedClients
  test: RaggedClients | None
  init_rows: Callable[[np.ndarray], Any]
  row_template: Any
  put: Callable[[Any], Any]
  devices: int = 1


def dense_layout_bytes(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray],
                       batch_size: int) -> int:
  """Bytes :func:`~isr_jax.data.packing.pack_clients` would take, from the sizes alone."""
  sizes = client_sizes(parts, batch_size, allow_empty=True)
  slots = max(-(-int(sizes.max()) // batch_size), 1) * batch_size
  per_example = x[:1].nbytes + y[:1].nbytes + 1  # + the mask byte
  return len(parts) * slots * per_example + 4 * len(parts)


def state_row_template(federated: FederatedRound, params: Any, x: np.ndarray, y: np.ndarray,
                       part: np.ndarray, batch_size: int) -> Any:
  """One client's state row (shapes and dtypes), traced on one client's rows."""
  one = pack_clients(x, y, [part], batch_size)
  spec = federated.spec
  stacked = jax.eval_shape(lambda p, d: init_client_states(
      federated.fns.algorithm, p, d, spec.aggregate_adapters, spec.channel), params, one)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), stacked)


def choose_placement(settings: PopulationSettings, *, dense_bytes: int, template: Any,
                     num_clients: int) -> str:
  """``device``, ``host`` or ``file`` for this run (:func:`isr_jax.fl.placement.resolve`)."""
  state = tree_bytes(template) * num_clients
  placement = resolve(settings.placement, dense_bytes=dense_bytes + state, state_bytes=state,
                      limit_bytes=settings.dense_limit_bytes)
  if placement != "device" and jax.process_count() > 1:
    raise ConfigError(
        f"fl.population.placement={settings.placement!r} ({placement} here): a population "
        f"kept on the host runs in one process, this job has {jax.process_count()}; set "
        "fl.population.placement='device' (the clients packed on the devices)")
  return placement


def resumed_placement(config, workdir: str) -> str | None:
  """Where a resumed run's clients live: where its checkpoints put them; ``None`` for a
  fresh run (``fl.population`` decides) or in CL mode."""
  if config.mode == "cl" or not checkpoint.saved_steps(workdir):
    return None
  found = checkpoint.saved_metadata(workdir, METADATA_KEY)
  return placement_for_resume(config.fl.population.placement, found and found[1], workdir)


def put_rows(tree: Any, mesh) -> Any:
  """Host rows onto ``mesh``: every array with a leading client axis split over
  ``clients``; :class:`ClientRows`' ``left_out`` (a scalar) replicated."""
  if isinstance(tree, ClientRows):
    left_out = None if tree.left_out is None else put_replicated(np.asarray(tree.left_out), mesh)
    return ClientRows(put_clients(np.asarray(tree.ids, np.int32), mesh),
                      put_clients(tree.data, mesh), left_out)
  return put_clients(tree, mesh)


def open_state_store(setup: PopulationSetup, workdir: str, num_clients: int,
                     resume_step: int) -> FileStateStore:
  """The run's client-state rows under ``<workdir>/client_states``, as of ``resume_step``.

  A fresh run (``resume_step`` 0) starts from no rows: what a run that died
  before its first checkpoint left there is removed. ``host`` keeps every row
  read in RAM; ``file`` keeps ``fl.population.cache_mib`` of them.
  """
  cache = (num_clients * tree_bytes(setup.row_template) if setup.placement == "host"
           else setup.settings.cache_bytes)
  store = FileStateStore(os.path.join(workdir, STATE_DIR), setup.init_rows, setup.row_template,
                         num_clients, cache_bytes=cache)
  store.restore(resume_step)
  return store


def commit_checkpoints(store: FileStateStore, saved_steps: Sequence[int], latest: int) -> None:
  """Lets the store drop rows no checkpoint on disk needs (``saved_steps``, each
  a step directory Orbax finished); rows newer than the newest are always kept."""
  done = sorted(s for s in saved_steps if s <= latest)
  if done:
    store.commit(done[-1], done)


def population_round(setup: PopulationSetup, round_fn: Callable, spec, store,
                     extra_data: tuple = ()) -> PopulationRound:
  """The run's round over its host-held population."""
  return PopulationRound(round_fn, spec, setup.train, store, put=setup.put,
                         extra_data=extra_data)


def evaluate_all(setup: PopulationSetup, client_eval_fn: Callable, state: TrainState, store,
                 num_clients: int) -> dict:
  """The personalized evaluation of every client, ``eval_chunk`` at a time."""
  return evaluate_population(client_eval_fn, state, setup.train, setup.test, store,
                             chunk=setup.settings.eval_chunk, num_clients=num_clients,
                             put=setup.put, multiple=setup.devices)


def example_round_inputs(setup: PopulationSetup, runner: PopulationRound,
                         state: TrainState) -> tuple[TrainState, ClientRows]:
  """A round's inputs with the shapes and shardings of every round's (for compiling)."""
  ids, left_out = runner.sample(np.asarray(jax.device_get(state.rng)), int(state.round))
  rows = jax.tree.map(lambda s: np.zeros((len(ids), *s.shape), s.dtype), setup.row_template)
  data: ClientData = runner.gather_data(ids)
  return (state._replace(client_states=setup.put(rows)),
          setup.put(ClientRows(ids, data, left_out)))
