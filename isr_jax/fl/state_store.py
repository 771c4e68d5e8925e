"""Per-client state off the accelerator: rows in host RAM or in versioned files on disk.

Personalized methods keep a whole model (and an algorithm's control variates)
per client: stacked ``[N, ...]`` on the accelerator, 1,000 ResNet-18 clients
already take ~45 GB. A round only touches the ``K`` sampled clients, so the
state lives in a *store* instead: the round ``gather`` s the rows of its ids,
the jitted round computes their new rows, and ``scatter`` writes them back.

Two stores share one interface (:class:`ClientStateStore`):

* :class:`HostStateStore` keeps the dense ``[N, ...]`` arrays in RAM;
* :class:`FileStateStore` keeps one file per (client, round) that wrote it,
  and creates nothing for clients that never trained (their rows come from
  ``init_row``).

Versions and checkpoints
------------------------
Every row written by ``scatter(ids, rows, step)`` is *version* ``step`` of
that client; the initial row is version 0. The row of client ``c`` *as of
step* ``s`` is its newest version ``<= s``. A store can therefore be rolled back
to any checkpoint step ``s`` (``restore(s)``) by forgetting the versions newer
than ``s``, as long as it still holds, for every client, its newest version
``<= s``. ``commit(step, keep_steps)`` is called once the checkpoint of
``step`` is durable; it may drop every version that no step in ``keep_steps``
needs: for each kept step ``k`` the newest version ``<= k`` stays, and every
version newer than ``max(keep_steps)`` stays (rounds after the checkpoint,
possibly still running while it was written). After a commit the store can
restore to any kept step, and to any step ``>= max(keep_steps)`` (nothing was
dropped there); other steps raise :class:`~isr_jax.errors.WorkdirError`.
Memory or disk is thus O(dense + rows written between the oldest kept step and
now).

Crash safety of the file store (``kill -9`` at any moment)
---------------------------------------------------------
1. A row file is complete or absent: it is written under a temporary name
   (fsynced by default) and ``os.replace`` d onto its final name, which is
   atomic; files are never modified in place. Leftover temporary files of a
   killed writer are deleted when a store is opened.
2. The rows of round ``t`` are written (``scatter``) before the caller writes
   the checkpoint of round ``t``, so a durable checkpoint ``s`` implies that all
   row versions ``<= s`` it needs are on disk.
3. ``commit(s, keep)`` runs only after checkpoint ``s`` is durable and deletes
   only versions that no kept step needs. It records ``keep`` (atomically)
   *before* deleting, so a crash halfway leaves extra files, never missing ones.
4. A resumed run reopens the directory (the version index is rebuilt by
   scanning it) and calls ``restore(s)`` with its latest checkpoint ``s``: the
   versions ``> s`` belong to rounds after the checkpoint, which will be
   recomputed, and are deleted, so they can never be mistaken for the rerun's
   rows. A row read back is checked (size, magic, layout, CRC-32); a damaged one
   raises :class:`~isr_jax.errors.WorkdirError` naming the file.

The file store is :class:`isr_jax.fl.file_store.FileStateStore`. The host
store has no files: it survives no crash, and its ``restore`` serves in-process
rollbacks (e.g. back to the last good checkpoint after a NaN); a run that
resumes with it rebuilds it from the checkpoint.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from isr_jax.errors import ConfigError, WorkdirError

STORE_KINDS = ("auto", "host", "file")
_SETTING = "fl.population.client_states"



def row_template_of(stacked: Any) -> Any:
  """The per-client row (shape and dtype without the client axis) of a stacked pytree."""
  def row(x: Any) -> jax.ShapeDtypeStruct:
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(tuple(np.shape(x)[1:]), np.dtype(dtype))
  return jax.tree.map(row, stacked)


def _kept_versions(versions: Sequence[int], keep_steps: Sequence[int]) -> set[int]:
  """The versions (sorted ascending) that the steps ``keep_steps`` still need.

  For each kept step the newest version ``<= k``; every version newer than the
  newest kept step (rows of rounds after it) also stays.
  """
  kept = set()
  newest_kept = max(keep_steps)
  for k in keep_steps:
    i = bisect.bisect_right(versions, k)
    if i:
      kept.add(versions[i - 1])
  kept.update(v for v in versions if v > newest_kept)
  return kept


class ClientStateStore:
  """The per-client state of ``num_clients`` clients, read and written by rows.

  Subclasses implement ``_read``/``_write``/``_drop``; this class checks the
  ids and rows, and keeps the version bookkeeping (see the module docstring).

  Attributes:
    num_clients: number of clients ``N``.
    row_template: pytree of ``jax.ShapeDtypeStruct``: one client's row.
  """

  # Whether ``restore(0)`` always works (the initial rows can be recomputed).
  _initial_always = False

  def __init__(self, row_template: Any, num_clients: int):
    if int(num_clients) < 1:
      raise ConfigError(f"{_SETTING}: the store needs at least one client, got {num_clients}")
    self.num_clients = int(num_clients)
    self.row_template = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(tuple(s.shape), np.dtype(s.dtype)), row_template)
    paths_specs, self._treedef = jax.tree_util.tree_flatten_with_path(self.row_template)
    self._names = [jax.tree_util.keystr(p) for p, _ in paths_specs]
    self._specs = [s for _, s in paths_specs]
    self._leaf_bytes = [int(np.prod(s.shape, dtype=np.int64)) * s.dtype.itemsize
                        for s in self._specs]
    self.row_nbytes = int(sum(self._leaf_bytes))
    # Client -> its versions on record, ascending (version 0, the initial row, is implicit).
    self._versions: dict[int, list[int]] = {}
    self._keep: list[int] | None = None  # keep_steps of the last commit
    self._closed = False

  # ---- the interface ----

  @property
  def nbytes_dense(self) -> int:
    """Bytes of the whole state stacked densely, ``N x`` one row."""
    return self.num_clients * self.row_nbytes

  def gather(self, ids: np.ndarray) -> Any:
    """The current rows of ``ids``, stacked ``[len(ids), ...]`` in the order of ``ids``.

    An id of ``-1`` marks a padding client (a round padded to a fixed number
    of clients): it gets the row of client 0, which the caller masks out.
    """
    ids = self._check_ids(ids)
    real = np.where(ids >= 0, ids, 0)
    out = [np.empty((len(ids), *s.shape), s.dtype) for s in self._specs]
    self._read(real, out)
    return jax.tree.unflatten(self._treedef, out)

  def scatter(self, ids: np.ndarray, rows: Any, step: int) -> None:
    """Writes the rows of the real ids (``>= 0``) as their state after round ``step``.

    Rows at ``-1`` (padding clients) are ignored; if an id occurs twice, its
    last row wins. ``step`` must be at least 1 (0 is the initial state) and
    not older than any client's current version nor than the last commit.
    """
    ids = self._check_ids(ids)
    step = int(step)
    leaves = self._check_rows(rows, len(ids))
    if step < 1:
      raise ValueError(f"scatter writes the state after a round (step >= 1), got step {step}")
    if self._keep is not None and step <= max(self._keep):
      raise ValueError(f"scatter at step {step} would change the committed checkpoint of "
                       f"step {max(self._keep)}: restore first")
    last: dict[int, int] = {}
    for i, c in enumerate(ids.tolist()):
      if c >= 0:
        last[c] = i
    for c in last:
      versions = self._versions.get(c)
      if versions and versions[-1] > step:
        raise ValueError(f"scatter at step {step}, but client {c} already has a row of step "
                         f"{versions[-1]}: restore the store to step {step - 1} first")
    if not last:
      return
    clients = np.fromiter(last.keys(), np.int64, len(last))
    positions = np.fromiter(last.values(), np.int64, len(last))
    self._write(clients, [leaf[positions] for leaf in leaves], step)
    for c in clients.tolist():
      versions = self._versions.setdefault(c, [])
      if not versions or versions[-1] != step:
        versions.append(step)

  def commit(self, step: int, keep_steps: Sequence[int]) -> None:
    """Marks the checkpoint of ``step`` durable; reclaims what ``keep_steps`` do not need.

    Args:
      step: the step whose checkpoint was just durably written.
      keep_steps: every checkpoint step still retained, ``step`` included.
        Afterwards the store restores to any of them (or any later step).
    """
    keep = sorted({int(k) for k in keep_steps} | {int(step)})
    if keep[0] < 0:
      raise ValueError(f"commit needs checkpoint steps >= 0, got keep_steps {keep}")
    self._record_commit(int(step), keep)
    self._keep = keep
    drops: dict[int, list[int]] = {}
    for c, versions in self._versions.items():
      kept = _kept_versions(versions, keep)
      gone = [v for v in versions if v not in kept]
      if gone:
        drops[c] = gone
    if drops:
      self._drop(drops)
      for c, gone in drops.items():
        left = [v for v in self._versions[c] if v not in set(gone)]
        if left:
          self._versions[c] = left
        else:
          del self._versions[c]

  def restore(self, step: int) -> None:
    """Makes the contents exactly those at checkpoint ``step`` (0: the initial state).

    Everything written after ``step`` is discarded; it belongs to rounds that
    the resumed run recomputes.
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"restore needs a step >= 0, got {step}")
    self._check_restorable(step)
    drops = {}
    for c, versions in self._versions.items():
      newer = versions[bisect.bisect_right(versions, step):]
      if newer:
        drops[c] = newer
    self._rollback(drops, step)
    for c, gone in drops.items():
      left = self._versions[c][:len(self._versions[c]) - len(gone)]
      if left:
        self._versions[c] = left
      else:
        del self._versions[c]
    if self._keep is not None and step not in self._keep:
      # Now at ``step``: the kept steps up to it, and any step from it on, are restorable.
      self._keep = sorted({k for k in self._keep if k <= step} | {step})
      self._record_commit(step, self._keep)

  def versions(self, client: int) -> list[int]:
    """The versions of ``client`` on record (ascending; the initial row, 0, not listed)."""
    return [v for v in self._versions.get(int(client), []) if v > 0]

  def close(self) -> None:
    """Releases what the store holds (caches, memory); it cannot be used afterwards."""
    self._closed = True

  def __enter__(self) -> ClientStateStore:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()

  # ---- for the stores ----

  def _read(self, ids: np.ndarray, out: list[np.ndarray]) -> None:
    raise NotImplementedError

  def _write(self, ids: np.ndarray, leaves: list[np.ndarray], step: int) -> None:
    raise NotImplementedError

  def _drop(self, drops: dict[int, list[int]]) -> None:
    raise NotImplementedError

  def _rollback(self, drops: dict[int, list[int]], step: int) -> None:
    raise NotImplementedError

  def _record_commit(self, step: int, keep: list[int]) -> None:
    pass

  def _describe(self) -> str:
    return type(self).__name__

  def _check_restorable(self, step: int) -> None:
    keep = self._keep
    if keep is None or step in keep or step >= max(keep):
      return
    if step == 0 and self._initial_always:
      return
    raise WorkdirError(f"{self._describe()} no longer holds the client states of step {step}: "
                       f"it restores to steps {keep} or any step >= {max(keep)}")

  def _check_ids(self, ids: Any) -> np.ndarray:
    if self._closed:
      raise ValueError(f"{self._describe()} is closed")
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
      raise ValueError(f"client ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < -1 or ids.max() >= self.num_clients):
      raise IndexError(f"client ids must lie in [0, {self.num_clients}) or be -1 (padding), "
                       f"got {ids.min()}..{ids.max()}")
    return ids

  def _check_rows(self, rows: Any, num: int) -> list[np.ndarray]:
    leaves, treedef = jax.tree.flatten(rows)
    if treedef != self._treedef:
      raise ValueError(f"rows have the structure {treedef}, the store {self._treedef}")
    out = []
    for name, spec, leaf in zip(self._names, self._specs, leaves, strict=True):
      leaf = np.asarray(leaf)
      if leaf.shape != (num, *spec.shape):
        raise ValueError(f"rows{name} has shape {leaf.shape}, expected {(num, *spec.shape)}")
      out.append(leaf.astype(spec.dtype, copy=False))
    return out


class HostStateStore(ClientStateStore):
  """Rows in host RAM: the dense ``[N, ...]`` arrays plus the old versions still needed.

  ``scatter`` moves a client's row it overwrites into a side table
  ``{(client, version): row}`` (copy on write), and ``commit`` deletes the
  entries no kept step needs, so memory is the dense state plus the rows
  written between the oldest kept checkpoint and now. The initial rows are old
  versions like any other: ``restore(0)`` works until a commit whose
  ``keep_steps`` exclude 0 reclaims them (a run back at step 0 builds a new store).

  Args:
    initial: pytree of arrays ``[N, ...]``, the state before the first round;
      the store takes a copy.
    num_clients: ``N``, needed only when ``initial`` has no leaves.
  """

  def __init__(self, initial: Any, num_clients: int | None = None):
    leaves = jax.tree.leaves(initial)
    if not leaves and num_clients is None:
      raise ValueError("an initial client state without leaves (FedAvg's) needs num_clients")
    num = int(np.shape(leaves[0])[0]) if leaves else int(num_clients)
    super().__init__(row_template_of(initial), num)
    self._dense = [np.array(leaf, dtype=s.dtype, copy=True)
                   for leaf, s in zip(jax.tree.leaves(initial), self._specs, strict=True)]
    for name, leaf in zip(self._names, self._dense, strict=True):
      if leaf.shape[0] != num:
        raise ValueError(f"initial{name} has {leaf.shape[0]} clients, the first leaf {num}")
    self._old: dict[tuple[int, int], list[np.ndarray]] = {}

  @property
  def nbytes_history(self) -> int:
    """Bytes held by old versions (what restoring to kept steps costs on top of dense)."""
    return len(self._old) * self.row_nbytes

  def _read(self, ids: np.ndarray, out: list[np.ndarray]) -> None:
    for dst, src in zip(out, self._dense, strict=True):
      np.take(src, ids, axis=0, out=dst)

  def _write(self, ids: np.ndarray, leaves: list[np.ndarray], step: int) -> None:
    for c in ids.tolist():
      versions = self._versions.setdefault(c, [0])
      if versions[-1] != step:
        self._old[(c, versions[-1])] = [leaf[c].copy() for leaf in self._dense]
    for dst, src in zip(self._dense, leaves, strict=True):
      dst[ids] = src

  def _drop(self, drops: dict[int, list[int]]) -> None:
    for c, gone in drops.items():
      for v in gone:
        self._old.pop((c, v), None)

  def _rollback(self, drops: dict[int, list[int]], step: int) -> None:
    for c, gone in drops.items():
      versions = self._versions[c]
      back = versions[len(versions) - len(gone) - 1]  # the newest version <= step
      row = self._old.pop((c, back))
      for dst, src in zip(self._dense, row, strict=True):
        dst[c] = src
      for v in gone[:-1]:
        self._old.pop((c, v), None)

  def close(self) -> None:
    self._dense = []
    self._old = {}
    super().close()


def choose_store(kind: str, nbytes_dense: int, limit_bytes: int) -> str:
  """``"host"`` or ``"file"``: where ``fl.population.client_states = kind`` puts the state.

  Args:
    kind: ``"auto"`` (the file store once the dense state exceeds
      ``limit_bytes``), ``"host"`` or ``"file"``.
    nbytes_dense: bytes of the state of all clients stacked densely.
    limit_bytes: the most host RAM the dense state may take under ``"auto"``
      (by default :func:`host_memory_budget`).
  """
  if kind not in STORE_KINDS:
    raise ConfigError(f"{_SETTING} = {kind!r}: use one of {', '.join(STORE_KINDS)}")
  if kind == "auto":
    return "file" if int(nbytes_dense) > int(limit_bytes) else "host"
  return kind


def host_memory_budget() -> int:
  """Half of the physical memory available now (bytes): the default limit of the host store."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024 // 2
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
  except (OSError, ValueError, AttributeError):
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
