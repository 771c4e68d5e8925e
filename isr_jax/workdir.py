"""A run's workdir: is it usable, and its small JSON files (``config.json``, ``summary.json``).

Every failure to read or write here becomes one :class:`WorkdirError` line
naming the path and the reason (a file in the workdir's place, read-only, disk
full). Files are replaced atomically (write a temporary file, fsync, rename),
so a kill or a full disk leaves the previous version, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator

from isr_jax.errors import WorkdirBusy, WorkdirError

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"

_HINTS = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space",
    errno.EROFS: "remount it read-write",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
}


def os_error_in(e: BaseException) -> OSError | None:
  """The OSError that caused ``e`` (itself, or along its ``__cause__``/``__context__``)."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError) and not isinstance(e, WorkdirError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def io_errno(e: BaseException) -> int | None:
  """The errno of a write that failed for a reason the user can fix (full, read-only), if any.

  TensorStore, which writes Orbax's checkpoints, reports these as ValueErrors
  with the C library's message in the text, so the text is searched too.
  """
  cause = os_error_in(e)
  if cause is not None and cause.errno:
    return cause.errno
  return next((code for code in _HINTS if os.strerror(code) in str(e)), None)


def io_error(path: str, e: BaseException) -> WorkdirError:
  """One line for an I/O failure at ``path``, saying that what was written is kept."""
  code = io_errno(e)
  reason = os.strerror(code) if code else " ".join(str(e).split())[:120]
  hint = _HINTS.get(code, "check it")
  return WorkdirError(f"cannot write {path}: {reason} — {hint} or use another --workdir; the "
                      "files already in it are kept")


# Glob characters: legal in file names, but Orbax reads checkpoint paths as patterns.
GLOB_CHARACTERS = "[]*?"


def prepare(workdir: str) -> None:
  """Creates ``workdir`` if needed and checks that files can be written in it.

  Raises:
    WorkdirError: it is a file, its path holds one of :data:`GLOB_CHARACTERS`,
      or it cannot be created or written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir {workdir} is a file, not a directory: use another --workdir")
  # Orbax globs under the checkpoint directory: with these characters in its path
  # it wrote steps that could not be read back (a "[1]" matches "1", not itself).
  special = sorted(set(GLOB_CHARACTERS) & set(os.path.abspath(workdir)))
  if special:
    raise WorkdirError(f"workdir {os.path.abspath(workdir)} has {' '.join(special)} in its path, "
                       "which checkpoints cannot be saved under: use another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
    # os.access says yes to root on a read-only mount; only a real write tells.
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise io_error(workdir, e) from e


LOCK_FILE = ".lock"


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
  """Holds the workdir's lock: a second run in the same workdir stops at once.

  An advisory ``flock`` on ``<workdir>/.lock``, which the kernel releases when
  the holder exits however it exits (kill -9 included), so no stale lock is
  ever left behind: a lock file left by a killed run does not block the next
  one. The file keeps the holder's pid, host and start time for the message.

  Raises:
    WorkdirBusy: another process holds the lock (one line naming it).
    WorkdirError: the lock file cannot be created.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise io_error(path, e) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
      raise WorkdirBusy(f"{workdir} is in use by {holder}: wait for that run to end, or use "
                        "another --workdir") from None
    except OSError as e:  # a file system without locks (some network mounts)
      raise WorkdirError(f"cannot lock {path}: {os.strerror(e.errno) if e.errno else e} — use "
                         "a --workdir on a file system that supports flock") from e
    try:
      os.ftruncate(fd, 0)
      started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
      os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} since {started}\n"
                .encode(), 0)
    except OSError as e:
      raise io_error(path, e) from e
    yield
  finally:
    os.close(fd)  # releases the lock


def write_atomic(path: str, text: str) -> None:
  """Replaces ``path`` by ``text`` all at once.

  Raises:
    WorkdirError: it cannot be written; the previous version is kept.
  """
  tmp = f"{path}.{os.getpid()}.tmp"  # processes writing the same file use their own
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise io_error(path, e) from e


def read_json(path: str) -> dict | None:
  """The object in a JSON file, or ``None`` if there is no such file.

  Raises:
    WorkdirError: the file is unreadable, not JSON, or not a JSON object.
  """
  try:
    with open(path) as f:
      obj = json.load(f)
  except FileNotFoundError:
    return None
  except json.JSONDecodeError as e:
    raise WorkdirError(f"{path} is damaged ({e.msg} at line {e.lineno}): repair or remove "
                       "it") from e
  except OSError as e:
    raise WorkdirError(f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}") from e
  if not isinstance(obj, dict):
    raise WorkdirError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object): repair "
                       "or remove it")
  return obj


def write_json(path: str, obj: dict) -> None:
  """Writes ``obj`` as indented, key-sorted JSON, atomically (see :func:`write_atomic`)."""
  write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
