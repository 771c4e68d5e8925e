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
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

import jax
import orbax.checkpoint as ocp

from isr_jax.errors import CheckpointError
from isr_jax.workdir import io_errno, io_error

logger = logging.getLogger("isr_jax")
CHECKPOINT_DIR = "checkpoints"
ITEM = "default"  # the subdirectory Orbax keeps a single-item manager's state in


def saved_steps(workdir: str) -> list[int]:
  """The rounds with a step directory under ``<workdir>/checkpoints``, intact or not."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


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


def save(manager: ocp.CheckpointManager, round_index: int, state) -> None:
  """Starts saving ``state`` as round ``round_index`` (after the previous save finished).

  Raises:
    WorkdirError: this or the previous save could not be written.
  """
  try:
    manager.save(round_index, args=ocp.args.StandardSave(state), force=True)
  except Exception as e:  # Orbax wraps the OSError of a failed write in its own types
    _raise_if_io(manager, e)
    raise


def wait(manager: ocp.CheckpointManager) -> None:
  """Blocks until the save in flight (if any) is on disk.

  Raises:
    WorkdirError: it could not be written.
  """
  try:
    manager.wait_until_finished()
  except Exception as e:
    _raise_if_io(manager, e)
    raise


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
    if not quiet:
      raise


def _missing(path: str) -> str | None:
  """Why a step directory cannot hold a checkpoint, judged without reading it, or ``None``.

  Checked before Orbax sees the step: restoring an empty step directory
  switches the manager into a multi-item mode in which every other step fails.
  """
  if not os.listdir(path):
    return "empty directory"
  if not os.path.isdir(os.path.join(path, ITEM)):
    return f"incomplete: no {ITEM}/ in it"
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
  ways: "RuntimeError: Event loop is closed" through ``sys.unraisablehook``;
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
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
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


def _restore_step(manager: ocp.CheckpointManager, step: int, abstract):
  """Step ``step`` restored into ``abstract``'s structure, old field names allowed."""
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as today:  # orbax raises many types for unreadable/mismatched data
    fields = getattr(abstract, "_fields", ())
    renamed = {new: old for old, new in RENAMED_STATE_FIELDS.items() if new in fields}
    if not renamed:
      raise
    target = {renamed.get(k, k): v for k, v in abstract._asdict().items()}
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception:
      raise today from None
  return type(abstract)(**{k: restored[renamed.get(k, k)] for k in fields})


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
