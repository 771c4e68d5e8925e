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

The run's config goes in too, so that runs are compared by their settings and
not by their folder names: as text (the TEXT tab, ``config``) and as the
hparams plugin's session info (the HPARAMS tab: one row per run, a column per
setting, next to the run's last ``test/`` and ``personal/`` scalars).
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence

from isr_jax.errors import WorkdirError
from isr_jax.metric_writer import JsonlWriter, read_metrics
from isr_jax.workdir import io_error

# Only files that end so are ours to replace; anything else in the workdir is left alone.
EVENTS_SUFFIX = ".isr_jax"


def event_files(logdir: str) -> list[str]:
  """This library's TensorBoard event files in ``logdir`` (not its subdirectories)."""
  pattern = f"events.out.tfevents.*{EVENTS_SUFFIX}"
  return sorted(glob.glob(os.path.join(glob.escape(logdir), pattern)))


def flat_settings(config: Mapping, prefix: str = "") -> dict[str, bool | int | float | str]:
  """``{"fl.algorithm": "fedavg", "isr.mi_weight": 0.1, ...}``: every leaf of a nested
  config, as the values the hparams plugin takes (a sequence or None as its text)."""
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flat_settings(value, f"{name}."))
    elif isinstance(value, (bool, int, float, str)):
      flat[name] = value
    else:
      flat[name] = json.dumps(value)
  return flat


class TensorBoardWriter:
  """Scalars per round, one tag per metric key (``train/loss``, ``test/accuracy``, ...).

  Args:
    logdir: the run's workdir.
    history: the records already in ``metrics.jsonl`` (``{"round": r, ...}``);
      they replace whatever events this library wrote there before.
    config: the run's config as plain data (``config.json``'s content), written
      as text and as hparams; ``None``: scalars only.
  """

  def __init__(self, logdir: str, history: Iterable[Mapping] = (),
               config: Mapping | None = None):
    from tensorboardX import SummaryWriter  # its import costs ~0.3 s; only runs that log pay

    for path in event_files(logdir):
      if os.path.isdir(path) and not os.path.islink(path):
        raise WorkdirError(f"{path} is not a file: move it away or use another --workdir")
      try:
        os.remove(path)
      except OSError as e:
        raise io_error(path, e) from e
    self._writer = SummaryWriter(logdir, filename_suffix=EVENTS_SUFFIX, flush_secs=30)
    if config is not None:
      self._add_config(config)
    for record in history:
      self._add(int(record["round"]), record)
    self.flush()

  def _add_config(self, config: Mapping) -> None:
    from tensorboardX.summary import hparams

    text = json.dumps(config, indent=2, sort_keys=True)
    # Indented four spaces: TensorBoard renders the text as Markdown, a code block keeps it.
    self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
    # Only the session's start: without an experiment summary of its own, TensorBoard
    # takes the hparams of every run in the logdir and lists their scalars as metrics,
    # so runs written apart (a sweep's workdirs) land in one table.
    _, session_start, _ = hparams(flat_settings(config), {})
    self._writer._get_file_writer().add_summary(session_start)

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


def fan_out(jsonl: JsonlWriter, workdir: str, *, tensorboard: bool,
            config: Mapping | None = None) -> FanOut:
  """``jsonl`` first, then (if asked) TensorBoard rebuilt from what ``jsonl`` holds, with
  ``config`` (plain data) as its text and hparams."""
  if not tensorboard:
    return FanOut([jsonl])
  history = read_metrics(jsonl.path) if os.path.exists(jsonl.path) else []
  return FanOut([jsonl, TensorBoardWriter(workdir, history, config)])
