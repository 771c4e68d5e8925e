"""Per-client state in versioned row files: :class:`FileStateStore`.

The design, the version rules and why a ``kill -9`` at any moment loses
nothing a checkpoint holds are in :mod:`isr_jax.fl.state_store`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from isr_jax.errors import ConfigError, WorkdirError
from isr_jax.fl.state_store import (
    _SETTING,
    ClientStateStore,
)

# Row file: a 64-byte header, then the leaves' bytes, each leaf at a 64-byte aligned offset.
_MAGIC = b"ISRROW01"
_HEADER = struct.Struct("<8sQI4x8sqq16x")  # magic, payload bytes, crc32, layout, client, step
_HEADER_BYTES = 64
_ALIGN = 64
_SUFFIX = ".row"
_TMP_MARK = ".tmp"
_COMMIT_FILE = "committed.json"
_NUM_BUCKETS = 256

assert _HEADER.size == _HEADER_BYTES


class FileStateStore(ClientStateStore):
  """Rows in versioned files under ``directory``, read on demand through an LRU cache.

  A client's row written after round ``t`` goes to its own file
  ``rows/<id % 256 as 2 hex digits>/<id>.<t>.row`` (a 64-byte header, then the
  leaves' bytes in the order of ``jax.tree.flatten(row_template)``), written
  under a temporary name and renamed (atomic), never modified in place.
  Clients never written cost no disk: their rows come from ``init_row``. On
  open the directory is scanned (rebuilding the version index after a crash)
  and leftover temporary files are deleted; after reopening, call
  ``restore(step)`` with the checkpoint step being resumed. See the module
  docstring for why this survives ``kill -9`` at any moment.

  Args:
    directory: where the rows live (created if missing).
    init_row: ``ids [k] -> pytree of arrays [k, ...]``: the initial rows of
      clients never written; deterministic (it is called again after a restore).
    row_template: pytree of ``jax.ShapeDtypeStruct``: one client's row.
    num_clients: ``N``.
    cache_bytes: bound on the decoded rows kept in RAM (0: no cache).
    fsync: fsync each row file and its directory before it counts as written,
      so that rows survive a power loss too (``kill -9`` needs only the rename).
  """

  _initial_always = True

  def __init__(self, directory: str | os.PathLike, init_row: Callable[[np.ndarray], Any],
               row_template: Any, num_clients: int, *, cache_bytes: int = 256 << 20,
               fsync: bool = True):
    super().__init__(row_template, num_clients)
    if int(cache_bytes) < 0:
      raise ConfigError(f"{_SETTING}: cache_bytes must be >= 0, got {cache_bytes}")
    self.directory = Path(directory)
    self._rows_dir = self.directory / "rows"
    self._init_row = init_row
    self._cache_bytes = int(cache_bytes)
    self._fsync = bool(fsync)
    self._cache: collections.OrderedDict[int, tuple[int, list[np.ndarray]]] = (
        collections.OrderedDict())
    self._offsets = []
    offset = 0
    for n in self._leaf_bytes:
      self._offsets.append(offset)
      offset += -(-n // _ALIGN) * _ALIGN
    self._payload_bytes = offset
    layout = repr([(n, s.shape, s.dtype.str) for n, s in zip(self._names, self._specs,
                                                             strict=True)])
    self._layout = hashlib.blake2b(layout.encode(), digest_size=8).digest()
    self._made_buckets: set[str] = set()
    if self.directory.exists() and not self.directory.is_dir():
      raise WorkdirError(f"{self.directory} is a file, not a directory of client states: "
                         "move it away or use another --workdir")
    try:
      self.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f"{self.directory}: cannot create the client-state directory "
                         f"({e.strerror}): use a writable --workdir") from e
    self._scan()
    self._keep = self._read_commit()

  # ---- opening ----

  def _scan(self) -> None:
    if not self._rows_dir.is_dir():
      return
    for bucket in os.scandir(self._rows_dir):
      if not bucket.is_dir():
        continue
      self._made_buckets.add(bucket.name)
      for entry in os.scandir(bucket.path):
        name = entry.name
        if _TMP_MARK in name:
          with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
          continue
        parts = name.split(".")
        if len(parts) != 3 or "." + parts[2] != _SUFFIX:
          continue
        try:
          c, v = int(parts[0]), int(parts[1])
        except ValueError:
          continue
        if not 0 <= c < self.num_clients or v < 1:
          raise WorkdirError(f"{entry.path} is a row of client {c} step {v}, but the store has "
                             f"{self.num_clients} clients: use the workdir of this run")
        self._versions.setdefault(c, []).append(v)
    for versions in self._versions.values():
      versions.sort()

  def _read_commit(self) -> list[int] | None:
    path = self.directory / _COMMIT_FILE
    try:
      record = json.loads(path.read_text())
      return sorted(int(k) for k in record["keep"])
    except FileNotFoundError:
      return None
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise WorkdirError(f"{path} is damaged ({e}): the checkpoint cannot be resumed from it; "
                         "start a new --workdir") from e

  # ---- paths and files ----

  def _bucket(self, client: int) -> str:
    return f"{client % _NUM_BUCKETS:02x}"

  def path(self, client: int, step: int) -> Path:
    """The file of ``client`` 's row written after round ``step``."""
    return self._rows_dir / self._bucket(client) / f"{client}.{step}{_SUFFIX}"

  def _describe(self) -> str:
    return str(self.directory)

  def _fsync_dir(self, path: Path) -> None:
    if not self._fsync:
      return
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

  def _encode(self, leaves: Iterable[np.ndarray], client: int, step: int) -> tuple[bytes, Any]:
    payload = np.zeros(self._payload_bytes, np.uint8)
    for leaf, offset, n in zip(leaves, self._offsets, self._leaf_bytes, strict=True):
      payload[offset:offset + n] = np.ascontiguousarray(leaf).reshape(-1).view(np.uint8)
    header = _HEADER.pack(_MAGIC, self._payload_bytes, zlib.crc32(payload), self._layout,
                          client, step)
    return header, payload

  def _decode(self, path: Path, client: int, step: int) -> list[np.ndarray]:
    def damaged(what: str) -> WorkdirError:
      return WorkdirError(f"{path} is damaged ({what}): the checkpoint cannot be resumed from "
                          "it; resume from an earlier checkpoint step or start a new --workdir")
    expected = _HEADER_BYTES + self._payload_bytes
    try:
      with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != expected:
          raise damaged(f"{size} bytes, a row takes {expected}")
        header = f.read(_HEADER_BYTES)
        payload = np.empty(self._payload_bytes, np.uint8)
        got = f.readinto(memoryview(payload))
    except FileNotFoundError as e:
      raise WorkdirError(f"{path} is missing (deleted by hand or by another process): the "
                         "checkpoint cannot be resumed from it; start a new --workdir") from e
    except OSError as e:
      raise damaged(f"unreadable: {e.strerror}") from e
    if len(header) != _HEADER_BYTES or got != self._payload_bytes:
      raise damaged("truncated")
    magic, nbytes, crc, layout, c, v = _HEADER.unpack(header)
    if magic != _MAGIC or nbytes != self._payload_bytes:
      raise damaged("not a client-state row")
    if layout != self._layout:
      raise WorkdirError(f"{path} holds a row of another layout (another model or algorithm): "
                         "use the workdir of this run or a new --workdir")
    if (c, v) != (client, step):
      raise damaged(f"it holds client {c} step {v}")
    if zlib.crc32(payload) != crc:
      raise damaged("checksum mismatch")
    return [payload[o:o + n].view(s.dtype).reshape(s.shape)
            for o, n, s in zip(self._offsets, self._leaf_bytes, self._specs, strict=True)]

  # ---- cache ----

  def _cached(self, client: int, version: int) -> list[np.ndarray] | None:
    hit = self._cache.get(client)
    if hit is None or hit[0] != version:
      return None
    self._cache.move_to_end(client)
    return hit[1]

  def _remember(self, client: int, version: int, row: list[np.ndarray]) -> None:
    if self.row_nbytes > self._cache_bytes:
      return
    self._cache[client] = (version, row)
    self._cache.move_to_end(client)
    while len(self._cache) * self.row_nbytes > self._cache_bytes:
      self._cache.popitem(last=False)

  # ---- the store ----

  def _read(self, ids: np.ndarray, out: list[np.ndarray]) -> None:
    fresh: dict[int, list[int]] = {}  # clients at their initial row -> positions
    done: dict[int, list[np.ndarray]] = {}
    for i, c in enumerate(ids.tolist()):
      row = done.get(c)
      if row is None:
        versions = self._versions.get(c)
        version = versions[-1] if versions else 0
        row = self._cached(c, version)
        if row is None and version:
          row = self._decode(self.path(c, version), c, version)
          self._remember(c, version, row)
        if row is None:
          fresh.setdefault(c, []).append(i)
          continue
        done[c] = row
      for dst, src in zip(out, row, strict=True):
        dst[i] = src
    if not fresh:
      return
    clients = np.fromiter(fresh.keys(), np.int64, len(fresh))
    init = self._check_rows(self._init_row(clients), len(clients))
    for j, c in enumerate(clients.tolist()):
      row = [leaf[j].copy() for leaf in init]
      self._remember(c, 0, row)
      for i in fresh[c]:
        for dst, src in zip(out, row, strict=True):
          dst[i] = src

  def _write(self, ids: np.ndarray, leaves: list[np.ndarray], step: int) -> None:
    buckets = set()
    for j, c in enumerate(ids.tolist()):
      row = [leaf[j] for leaf in leaves]
      final = self.path(c, step)
      bucket = final.parent
      if bucket.name not in self._made_buckets:
        try:
          bucket.mkdir(parents=True, exist_ok=True)
        except OSError as e:
          raise WorkdirError(f"{bucket}: cannot create ({e.strerror}): use a writable "
                             "--workdir") from e
        self._fsync_dir(self._rows_dir)
        self._made_buckets.add(bucket.name)
      tmp = final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}")
      header, payload = self._encode(row, c, step)
      try:
        with open(tmp, "wb") as f:
          f.write(header)
          f.write(memoryview(payload))
          if self._fsync:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
      except OSError as e:
        with contextlib.suppress(OSError):
          os.unlink(tmp)
        raise WorkdirError(f"{final}: cannot write a client-state row ({e.strerror}): free "
                           "disk space or use another --workdir") from e
      buckets.add(bucket)
      self._remember(c, step, [np.array(x, copy=True) for x in row])
    for bucket in buckets:
      self._fsync_dir(bucket)

  def _unlink(self, drops: dict[int, list[int]]) -> None:
    buckets = set()
    for c, gone in drops.items():
      for v in gone:
        path = self.path(c, v)
        with contextlib.suppress(FileNotFoundError):
          os.unlink(path)
        buckets.add(path.parent)
    for bucket in buckets:
      self._fsync_dir(bucket)

  def _drop(self, drops: dict[int, list[int]]) -> None:
    self._unlink(drops)

  def _rollback(self, drops: dict[int, list[int]], step: int) -> None:
    self._unlink(drops)
    self._cache.clear()

  def _record_commit(self, step: int, keep: list[int]) -> None:
    path = self.directory / _COMMIT_FILE
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    try:
      with open(tmp, "w") as f:
        json.dump({"step": step, "keep": keep}, f)
        if self._fsync:
          f.flush()
          os.fsync(f.fileno())
      os.replace(tmp, path)
    except OSError as e:
      raise WorkdirError(f"{path}: cannot write ({e.strerror}): free disk space or use "
                         "another --workdir") from e
    self._fsync_dir(self.directory)

  def disk_bytes(self) -> int:
    """Bytes of the row files on disk."""
    return sum(len(v) for v in self._versions.values()) * (_HEADER_BYTES + self._payload_bytes)

  def close(self) -> None:
    self._cache.clear()
    super().close()
