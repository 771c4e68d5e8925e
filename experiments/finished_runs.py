"""A finished run's workdir, restored for a measurement: config, experiment, final state.

Commands that measure the final model of runs written by
:func:`isr_jax.train.train_and_evaluate` (``experiments.flatness``,
``experiments.isr_diagnostics``) rebuild the experiment from the workdir's
``config.json`` and restore its latest intact checkpoint. A workdir that cannot
be measured raises :class:`Skipped`, whose message is the one line the command
prints; the command goes on with the other workdirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import ml_collections
import numpy as np

from experiments.records import SWEEP_FILE, run_record
from isr_jax import checkpoint
from isr_jax import workdir as workdir_files
from isr_jax.config import saved_config
from isr_jax.errors import CheckpointError, ConfigError, DataNotFoundError, WorkdirError
from isr_jax.experiment import Experiment, build_experiment, load_splits
from isr_jax.fl.population_setup import resumed_placement
from isr_jax.state import TrainState

# What the library raises for a workdir, config or data that cannot be used; each
# message is one line, so it becomes the workdir's one ``error:`` line.
LIBRARY_ERRORS = (ConfigError, DataNotFoundError, CheckpointError, WorkdirError)


class Skipped(Exception):
  """A workdir that cannot be measured; the message is its one line."""


class FinishedRun(NamedTuple):
  """A run rebuilt from its workdir.

  Attributes:
    workdir: where it was read from.
    config: its ``config.json``.
    experiment: :func:`isr_jax.experiment.build_experiment` of that config (data,
      model, objective; nothing trained).
    state: the latest intact checkpoint (``state.round`` rounds trained).
  """

  workdir: str
  config: ml_collections.ConfigDict
  experiment: Experiment
  state: TrainState


@contextlib.contextmanager
def skipping(workdir: str) -> Iterator[None]:
  """Turns the library's one-line errors inside the block into :class:`Skipped`."""
  try:
    yield
  except LIBRARY_ERRORS as e:
    raise Skipped(f"{workdir}: {e}; skipped") from e


def _restore(config: ml_collections.ConfigDict, workdir: str, exp: Experiment) -> TrainState:
  manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
  try:
    state = checkpoint.restore_latest(manager, exp.state)
  finally:
    checkpoint.close(manager, quiet=True)
  if state is None:  # every step directory was set aside as damaged
    raise Skipped(f"{workdir}: no intact checkpoint in {manager.directory}; skipped")
  return state


def load_run(workdir: str) -> FinishedRun:
  """Rebuilds ``workdir``'s experiment from its config.json and restores its latest checkpoint.

  Raises:
    Skipped: no config.json, a config.json that is not JSON, no checkpoint, or
      one of the library's errors (one line each).
  """
  config_path = os.path.join(workdir, workdir_files.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise Skipped(f"{workdir}: no {config_path} (not the workdir of a run?); skipped")
  if not checkpoint.saved_steps(workdir):
    raise Skipped(f"{workdir}: no checkpoint in "
                  f"{os.path.join(workdir, checkpoint.CHECKPOINT_DIR)}; skipped")
  try:
    with open(config_path) as f:
      config = saved_config(json.load(f))
  except json.JSONDecodeError as e:
    raise Skipped(f"{workdir}: {config_path} is not JSON ({e.msg} at line {e.lineno}); "
                  "skipped") from e
  with skipping(workdir):
    exp = build_experiment(config, resumed_placement(config, workdir))
    state = _restore(config, workdir, exp)
  return FinishedRun(workdir, config, exp, state)


def training_examples(config: ml_collections.ConfigDict, examples: int, seed: int):
  """``(x, y, ignore_index)``: a seeded subset of ``examples`` rows of the run's training split.

  Loaded as the run loaded it (:func:`isr_jax.experiment.load_splits`: same split,
  same standardisation), since the experiment does not keep the split;
  all rows, in order, when the split has at most ``examples``.
  """
  train, _, info = load_splits(config)
  n = len(train.y)
  rows = np.sort(np.random.default_rng(seed).choice(n, size=min(examples, n), replace=False))
  return np.asarray(train.x)[rows], np.asarray(train.y)[rows], info.ignore_index


def run_workdirs(paths: list[str]) -> tuple[list[str], list[str]]:
  """``(workdirs to measure, lines about runs left out)``: a sweep directory becomes its runs.

  A path holding ``sweep.json`` stands for every run listed there whose record
  says ``done``; the others (missing, partial, diverged) get a line each.
  """
  workdirs, notes = [], []
  for path in paths:
    spec_path = os.path.join(path, SWEEP_FILE)
    if not os.path.isfile(spec_path):
      workdirs.append(path)
      continue
    spec = workdir_files.read_json(spec_path)
    for run in spec["runs"]:
      run_dir = os.path.join(path, run["name"])
      status = run_record(run_dir, run)["status"]
      if status == "done":
        workdirs.append(run_dir)
      else:
        notes.append(f"{run_dir}: {status}, not measured")
  return workdirs, notes


def measure_each(paths: list[str], measure: Callable[[str], dict],
                 describe: Callable[[str, dict], str], output_file: str, *,
                 redo: bool = False) -> int:
  """``measure(workdir)`` for every run of ``paths``, one printed line each.

  A run whose ``output_file`` exists was measured before and is kept unless
  ``redo``; a run that cannot be measured gets one ``error:`` line on stderr.

  Returns:
    How many runs were skipped for an error (a command exits 1 if any).
  """
  try:
    workdirs, notes = run_workdirs(paths)
  except (WorkdirError, KeyError, TypeError) as e:
    sys.exit(f"error: a sweep.json cannot be read: {e}")
  for note in notes:
    print(note, flush=True)
  skipped = 0
  for workdir in workdirs:
    out = os.path.join(workdir, output_file)
    if not redo and os.path.exists(out):
      print(f"{workdir}: measured earlier, {out} kept (--redo measures again)", flush=True)
      continue
    try:
      record = measure(workdir)
    except Skipped as e:
      print(f"error: {e}", file=sys.stderr)
      skipped += 1
      continue
    print(describe(workdir, record), flush=True)
  return skipped
