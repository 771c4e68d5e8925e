"""Orbax checkpoints of the whole :class:`~isr_jax.state.TrainState`, with resume.

A run saves every ``checkpoint_every`` rounds and at the end into
``<workdir>/checkpoints/<round>``. Saves are asynchronous: :func:`save` returns
once the state is copied to host memory (so the next round may donate its
buffers) and Orbax writes the files while training goes on; it waits for a
save in flight before starting the next, and :func:`close` waits for the last.
Orbax writes each step into a temporary directory and renames it when complete,
so a kill during a save leaves the previous step as the latest.

A restarted run restores the newest step that reads back into the structure of
a freshly initialised state; a damaged newer step (unreadable files, an empty
directory) is moved aside to ``<round>.damaged`` — never deleted — so that the
resumed run can save that round again.

Each step also keeps the run's config and the shape of its examples
(:func:`saved_metadata`), and is checked once written (:func:`wait`), so that a
step that could not be read back is reported while the run can still say so.
A failed background save surfaces at the next wait and leaves no Orbax thread
behind that would keep the process from exiting.
"""

from __future__ import annotations

import glob
import inspect
import json
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

from isr_jax.errors import CheckpointError, WorkdirError
from isr_jax.workdir import io_errno, io_error

logger = logging.getLogger("isr_jax")
CHECKPOINT_DIR = "checkpoints"
ITEM = "default"  # the subdirectory Orbax keeps a single-item manager's state in
STEP_METADATA = "_CHECKPOINT_METADATA"  # Orbax's JSON file in each step (custom_metadata)


def saved_steps(workdir: str) -> list[int]:
  """The rounds with a step directory under ``<workdir>/checkpoints``, intact or not."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def prepare_directory(workdir: str) -> None:
  """Checks, before anything is written, that ``<workdir>/checkpoints`` can take checkpoints.

  Orbax finds out only in its background save, after a round was trained and
  logged, and then leaves threads behind that wait for a step directory that
  never comes.

  Raises:
    WorkdirError: it is not a directory, or it cannot be created or written.
  """
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise WorkdirError(f"{directory} is a file, not a directory of checkpoints: move it away "
                       "or use another --workdir")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):  # only a real write tells (root, read-only mounts)
      pass
  except OSError as e:
    raise io_error(directory, e) from e


def saved_metadata(workdir: str, key: str) -> tuple[int, Any] | None:
  """``(round, value)`` of ``key`` in the metadata of the newest step holding it, or ``None``.

  :func:`save` keeps the run's config (``"config"``) and the shape of its
  examples (``"input_shape"``) with each step, so that a resume whose
  ``config.json`` was lost, or whose data changed, is still compared with what
  its checkpoints were trained under. Steps saved before that hold neither.
  """
  for step in reversed(saved_steps(workdir)):
    path = os.path.join(workdir, CHECKPOINT_DIR, str(step), STEP_METADATA)
    try:
      with open(path) as f:
        value = json.load(f).get("custom_metadata", {}).get(key)
    except (OSError, ValueError, AttributeError):  # a damaged step: look at older ones
      continue
    if value is not None:
      return step, value
  return None


def checkpoint_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """An asynchronous manager over ``<workdir>/checkpoints`` keeping the ``keep`` latest rounds.

  Raises:
    WorkdirError: the directory cannot be created (read-only, disk full).
  """
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  try:
    return ocp.CheckpointManager(directory, options=options)
  except OSError as e:
    raise io_error(directory, e) from e


def _raise_if_io(manager: ocp.CheckpointManager, e: Exception) -> None:
  """Re-raises an I/O failure of a save (disk full, read-only) as one WorkdirError line."""
  if io_errno(e) is not None:
    raise io_error(str(manager.directory), e) from e


def save(manager: ocp.CheckpointManager, round_index: int, state,
         metadata: dict | None = None) -> None:
  """Starts saving ``state`` as round ``round_index`` (after the previous save finished).

  Args:
    manager: from :func:`checkpoint_manager`.
    round_index: the step's number.
    state: the pytree to save.
    metadata: plain data kept with the step (see :func:`saved_metadata`).

  Raises:
    WorkdirError: this or the previous save could not be written.
    CheckpointError: the previous save was written but cannot be read back.
  """
  wait(manager)  # Orbax waits anyway; this way the previous step is checked first
  try:
    manager.save(round_index, args=ocp.args.StandardSave(state), force=True,
                 custom_metadata=metadata)
  except Exception as e:  # Orbax wraps the OSError of a failed write in its own types
    _raise_if_io(manager, e)
    raise


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the save in flight (if any) is on disk, and checks the newest step.

  Raises:
    WorkdirError: it could not be written.
    CheckpointError: it was written without what a restore needs.
  """
  try:
    manager.wait_until_finished()
  except Exception as e:
    _raise_if_io(manager, e)
    raise
  step = manager.latest_step()
  if step is None or jax.process_index() != 0:  # process 0 finalizes the step
    return
  path = os.path.join(str(manager.directory), str(step))
  reason = _missing(path) if os.path.isdir(path) else None
  if reason is not None:
    raise CheckpointError(f"the checkpoint of round {step} was written to {path} but cannot be "
                          f"read back ({reason}): use another --workdir")


def _release_waiting_threads() -> None:
  """Lets the threads of a save that failed early end, so that the process can exit.

  A save that fails before its step directory exists leaves Orbax threads
  waiting for that directory's signal, which never comes; they are not daemon
  threads, so the interpreter would wait at exit for Orbax's coordination
  timeout (5 minutes). Each is cancelled and then sent its signal: it wakes,
  sees the cancellation and returns without writing anything. Orbax's private
  API: if it changes, this does nothing. Their coroutines, never run, are not
  reported at exit either.
  """
  _quiet_orphaned_reads()
  try:
    from orbax.checkpoint._src.futures import future as orbax_future

    waiting = [t for t in threading.enumerate()
               if isinstance(t, orbax_future._SignalingThread) and t.is_alive()]
    for thread in waiting:
      thread.cancel()
      orbax_future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
  except (ImportError, AttributeError):
    return
  for thread in waiting:
    threading.Thread.join(thread, timeout=10)  # its own join raises on cancelled threads
    if not thread.is_alive():
      _close_coroutines(getattr(thread, "_target", None))


def _close_coroutines(function, depth: int = 3) -> None:
  """Closes the coroutines a function holds in its closure (and its closures' functions).

  A cancelled Orbax thread never starts its coroutine, which would otherwise
  warn "coroutine ... was never awaited" when collected.
  """
  for cell in getattr(function, "__closure__", None) or ():
    try:
      value = cell.cell_contents
    except ValueError:  # an empty cell
      continue
    if inspect.iscoroutine(value) and inspect.getcoroutinestate(value) == "CORO_CREATED":
      with warnings.catch_warnings():  # closing it is what reports it: not here
        warnings.simplefilter("ignore", RuntimeWarning)
        value.close()
    elif callable(value) and depth > 1:
      _close_coroutines(value, depth - 1)


def close(manager: ocp.CheckpointManager, *, quiet: bool = False) -> None:
  """Waits for the save in flight and stops Orbax's background threads.

  Closing matters even when training failed: an open manager's threads die
  with the interpreter and print tracebacks ("Event loop is closed") after the
  error line. ``quiet`` drops a failure of the save in flight, for use while
  another error is already on its way to the user.
  """
  try:
    wait(manager)
    manager.close()
  except Exception:
    _release_waiting_threads()
    if not quiet:
      raise
  if quiet:  # a save may have failed before this wait, its threads still waiting
    _release_waiting_threads()


def _missing(path: str) -> str | None:
  """Why a step directory cannot hold a checkpoint, judged without reading it, or ``None``.

  Checked before Orbax sees the step: restoring an empty step directory
  switches the manager into a multi-item mode in which every other step fails.
  """
  if not os.listdir(path):
    return "empty directory"
  item = os.path.join(path, ITEM)
  if not os.path.isdir(item):
    return f"incomplete: no {ITEM}/ in it"
  # Orbax writes each process's arrays apart, then merges their indexes into
  # one manifest; without it (a merge that found nothing) no array can be read.
  if (glob.glob(os.path.join(glob.escape(item), "ocdbt.process_*"))
      and not os.path.exists(os.path.join(item, "manifest.ocdbt"))):
    return f"incomplete: no {ITEM}/manifest.ocdbt in it"
  return None


def _failure(e: Exception) -> str:
  """Why a step did not restore, in a few words (never Orbax's or TensorStore's repr)."""
  text = " ".join(str(e).split())
  if "tree" in text.lower() and ("structure" in text.lower() or "mismatch" in text.lower()):
    return "its state does not match this config's model and algorithm"
  status = re.match(r"([A-Z][A-Z_]+): ", text)  # TensorStore's absl status code
  if status:
    return f"unreadable files ({status.group(1)})"
  return f"unreadable ({type(e).__name__}: {text[:60]})" if text else \
      f"unreadable ({type(e).__name__})"


def _quiet_orphaned_reads() -> None:
  """Silences the messages of reads a failed restore leaves behind.

  When one array of a step fails to read, Orbax closes its event loop while
  TensorStore still completes the step's other reads, possibly long after the
  restore returned (even at interpreter exit). Each reports in one of three
  ways: "RuntimeError: Event loop is closed" (or another error of an Orbax
  coroutine being collected) through ``sys.unraisablehook``;
  asyncio's "Task (or Future) exception was never retrieved" log record with a
  TensorStore repr; a "coroutine ... was never awaited" RuntimeWarning. Only
  those are dropped; everything else reaches the previous hook and handlers.
  Installed before the first read, since the first failure can report before
  the restore has even raised.
  """
  if getattr(sys.unraisablehook, "_isr_jax_quiet", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    closed_loop = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    # An abandoned Orbax coroutine (_read_array_index_and_device_put) failing as it is
    # collected: its step was already reported as skipped or unrestorable.
    code = getattr(unraisable.object, "cr_code", None)
    orbax_coroutine = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed_loop or orbax_coroutine):
      previous(unraisable)

  hook._isr_jax_quiet = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: not record.getMessage().startswith(_ORPHANED_READ_LOGS))
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)


_ORPHANED_READ_LOGS = ("Future exception was never retrieved",
                       "Task exception was never retrieved")


def _set_aside(path: str) -> str:
  """Renames a damaged step out of Orbax's view (``N`` -> ``N.damaged[.k]``); returns the name."""
  target, k = path + ".damaged", 0
  while os.path.exists(target):
    k += 1
    target = f"{path}.damaged.{k}"
  os.rename(path, target)
  return target


# TrainState fields renamed since checkpoints were first written, old -> new: a
# step saved under an old name restores under it and is renamed in memory, so
# runs started before the rename resume.
RENAMED_STATE_FIELDS = {"alpha": "mix_weight"}
# TrainState fields added after checkpoints were written, with the value such a
# checkpoint's run had (an empty tree: nothing to restore).
ADDED_STATE_FIELDS = ("channel_state",)


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract):
  """Step ``step`` restored into ``abstract``'s structure, old field names allowed.

  A checkpoint written before a field of :data:`ADDED_STATE_FIELDS` existed
  restores when this run's value of that field is empty (the feature is off).
  """
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as today:  # orbax raises many types for unreadable/mismatched data
    fields = getattr(abstract, "_fields", ())
    renamed = {new: old for old, new in RENAMED_STATE_FIELDS.items() if new in fields}
    absent = tuple(f for f in ADDED_STATE_FIELDS
                   if f in fields and not jax.tree.leaves(getattr(abstract, f)))
    # The layouts older checkpoints may have: fields added since, names changed since.
    layouts = [(names, drop) for names in ({}, renamed) for drop in ((), absent)
               if names or drop]
    for names, drop in layouts:
      target = {names.get(k, k): v for k, v in abstract._asdict().items() if k not in drop}
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception:  # not this layout either
        continue
      return type(abstract)(**{k: restored[names.get(k, k)] for k in fields if k not in drop},
                            **{k: getattr(abstract, k) for k in drop})
    raise today from None


def restore_latest(manager: ocp.CheckpointManager, like):
  """The newest intact saved state, restored into the structure of ``like``, or ``None``.

  Steps that fail to restore are skipped newest first; once an older step
  restores, each skipped one is moved aside (never deleted), with one logged
  line, so that the resumed run can save those rounds again.

  Raises:
    CheckpointError: steps exist but none restores (one line with each step's reason).
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  _quiet_orphaned_reads()
  skipped: list[tuple[int, str, str]] = []
  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    reason = _missing(path)
    if reason is None:
      try:
        state = _restore_step(manager, step, abstract)
      except Exception as e:  # orbax raises many types for unreadable/mismatched data
        reason = _failure(e)
    if reason is not None:
      skipped.append((step, path, reason))
      continue
    for bad, bad_path, reason in skipped:
      try:
        kept = _set_aside(bad_path)
      except OSError as e:
        raise io_error(bad_path, e) from e
      logger.warning("checkpoint of round %d skipped (%s) and kept as %s; resuming from round %d",
                     bad, reason, kept, step)
    if skipped:
      manager.reload()
    return state
  reasons = "; ".join(f"round {s}: {r}" for s, _, r in skipped)
  raise CheckpointError(
      f"no checkpoint in {manager.directory} can be restored ({reasons}); they were left "
      "untouched — use another --workdir, or remove them to start over")
