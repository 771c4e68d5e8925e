"""Where a round's metrics go besides ``metrics.jsonl``: TensorBoard, and the fan-out.

``metrics.jsonl`` stays the record of a run; the TensorBoard events are a view
of it. They are written with tensorboardX, which needs neither TensorFlow nor
PyTorch, into the workdir itself, so ``tensorboard --logdir runs/`` names each
run after its workdir.

A resumed run rewrites the events from ``metrics.jsonl`` (already truncated to
the restored checkpoint) before training on. Appending instead would leave the
rounds a killed run computed after its last checkpoint in the old event file,
and the resumed run computes them again: TensorBoard would show two points per
such round. Rewriting costs one scalar per metric and round, milliseconds.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from isr_jax.metric_writer import JsonlWriter, read_metrics

# Only files that end so are ours to replace; anything else in the workdir is left alone.
EVENTS_SUFFIX = ".isr_jax"


def event_files(logdir: str) -> list[str]:
  """This library's TensorBoard event files in ``logdir`` (not its subdirectories)."""
  pattern = f"events.out.tfevents.*{EVENTS_SUFFIX}"
  return sorted(glob.glob(os.path.join(glob.escape(logdir), pattern)))


class TensorBoardWriter:
  """Scalars per round, one tag per metric key (``train/loss``, ``test/accuracy``, ...).

  Args:
    logdir: the run's workdir.
    history: the records already in ``metrics.jsonl`` (``{"round": r, ...}``);
      they replace whatever events this library wrote there before.
  """

  def __init__(self, logdir: str, history: Iterable[Mapping] = ()):
    from tensorboardX import SummaryWriter  # its import costs ~0.3 s; only runs that log pay

    for path in event_files(logdir):
      os.remove(path)
    self._writer = SummaryWriter(logdir, filename_suffix=EVENTS_SUFFIX, flush_secs=30)
    for record in history:
      self._add(int(record["round"]), record)
    self.flush()

  def _add(self, round_index: int, metrics: Mapping) -> None:
    for key, value in sorted(metrics.items()):
      # Non-finite values reach metrics.jsonl as strings ("nan"): TensorBoard has no
      # use for them, and the run stops on them anyway.
      if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
        self._writer.add_scalar(key, float(value), round_index)

  def write(self, round_index: int, metrics: Mapping[str, float]) -> None:
    self._add(round_index, metrics)
    # Every round on disk at once: TensorBoard follows a run live, and a killed
    # run loses nothing that metrics.jsonl has.
    self.flush()

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class FanOut:
  """Sends every ``write(round, metrics)`` to several writers, in order."""

  def __init__(self, writers: Sequence):
    self.writers = tuple(writers)

  def write(self, round_index: int, metrics: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write(round_index, metrics)

  def close(self) -> None:
    for w in self.writers:
      if hasattr(w, "close"):
        w.close()


def fan_out(jsonl: JsonlWriter, workdir: str, *, tensorboard: bool) -> FanOut:
  """``jsonl`` first, then (if asked) TensorBoard rebuilt from what ``jsonl`` holds."""
  if not tensorboard:
    return FanOut([jsonl])
  history = read_metrics(jsonl.path) if os.path.exists(jsonl.path) else []
  return FanOut([jsonl, TensorBoardWriter(workdir, history)])
