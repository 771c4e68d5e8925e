"""Runs left alone: workdir paths, failed background saves, the lock, and what a
resume or a personalized run used to accept without a word (issue 31)."""

import errno
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
from support import digits
from test_train import tiny

from isr_jax import checkpoint, metric_writer, workdir, writers
from isr_jax.config import validate
from isr_jax.data import partition
from isr_jax.errors import CheckpointError, ConfigError, WorkdirBusy, WorkdirError
from isr_jax.experiment import _partition_fl, build_experiment
from isr_jax.fl.evaluate_clients import client_accuracy_stats
from isr_jax.train import train_and_evaluate

STATE = {"w": jnp.arange(4.0), "b": jnp.ones((2, 2))}


def orbax_threads_waiting():
  from orbax.checkpoint._src.futures import future

  return [t for t in threading.enumerate()
          if isinstance(t, future._SignalingThread) and t.is_alive()]


@pytest.mark.parametrize("name", ["a[1]", "a*b", "what?"])
def test_a_workdir_path_with_glob_characters_is_refused_before_anything_is_written(
    tmp_path, name):
  # Orbax globbed under such a path: every checkpoint was written without its index.
  with pytest.raises(WorkdirError, match=r"has .* in its path, which checkpoints cannot be "
                     r"saved under: use another --workdir") as info:
    workdir.prepare(str(tmp_path / name / "run"))
  assert "\n" not in str(info.value)
  assert os.listdir(tmp_path) == []


def test_a_step_saved_without_its_index_is_caught_after_the_save(tmp_path):
  manager = checkpoint.checkpoint_manager(str(tmp_path), keep=2)
  try:
    checkpoint.save(manager, 1, STATE)
    checkpoint.wait(manager)  # a good step passes the check
    # What a save under a "[...]" path left: the per-process data, no merged manifest.
    os.remove(tmp_path / "checkpoints" / "1" / "default" / "manifest.ocdbt")
    with pytest.raises(CheckpointError, match=r"round 1 was written to .* but cannot be read "
                       r"back \(incomplete: no default/manifest\.ocdbt in it\)"):
      checkpoint.wait(manager)
  finally:
    checkpoint.close(manager, quiet=True)


def save_into_a_vanished_directory(workdir):
  """The error of a save whose checkpoints/ became a file behind the manager's back."""
  manager = checkpoint.checkpoint_manager(workdir, keep=2)
  shutil.rmtree(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "checkpoints"), "w") as f:
    f.write("x")
  try:
    checkpoint.save(manager, 1, STATE)
    checkpoint.wait(manager)
  except WorkdirError as e:
    return str(e)  # not the exception: its frames would keep Orbax's coroutines alive
  finally:
    checkpoint.close(manager, quiet=True)


def test_a_failed_background_save_leaves_no_thread_that_blocks_exit(tmp_path):
  # The step directory cannot be made, and Orbax's threads waiting for it kept the
  # process from exiting for 5 minutes.
  assert "checkpoints: Not a directory" in save_into_a_vanished_directory(str(tmp_path))
  deadline = time.monotonic() + 20
  while orbax_threads_waiting() and time.monotonic() < deadline:
    time.sleep(0.1)
  assert orbax_threads_waiting() == []


def test_checkpoints_that_are_a_file_or_read_only_stop_the_run_before_it_writes(
    tmp_path, monkeypatch):
  (tmp_path / "checkpoints").write_text("x")
  with pytest.raises(WorkdirError, match=r"checkpoints is a file, not a directory of "
                     "checkpoints: move it away or use another --workdir"):
    train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [workdir.LOCK_FILE, "checkpoints"]

  def read_only(*args, **kwargs):
    raise OSError(30, os.strerror(30))

  monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile", read_only)
  with pytest.raises(WorkdirError, match=r"checkpoints: Read-only file system"):
    checkpoint.prepare_directory(str(tmp_path / "other"))


def test_the_lock_names_its_holder_and_a_killed_holder_does_not_block(tmp_path, monkeypatch):
  # What a run killed with SIGKILL leaves: the file, with its pid, but no flock.
  (tmp_path / workdir.LOCK_FILE).write_text("process 999999 on gone since 2020-01-01\n")
  with (workdir.exclusive(str(tmp_path)), pytest.raises(WorkdirBusy) as info,
        workdir.exclusive(str(tmp_path))):
    pass
  assert re.search(rf"in use by process {os.getpid()} on \S+ since "
                   r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: wait", str(info.value))

  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(workdir.fcntl, "flock", no_locks)
  with (pytest.raises(WorkdirError, match=r"cannot lock .*\.lock: No locks available — use a "
                      "--workdir on a file system that supports flock"),
        workdir.exclusive(str(tmp_path))):
    pass


def test_damaged_workdir_files_are_one_line(tmp_path):
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(WorkdirError, match=r"config\.json is damaged \(a JSON list, not an "
                     r"object\): repair or remove it"):
    workdir.read_json(str(tmp_path / "config.json"))
  os.mkdir(tmp_path / metric_writer.METRICS_FILE)
  with pytest.raises(WorkdirError, match=r"metrics\.jsonl is not a file: move it away"):
    metric_writer.JsonlWriter(str(tmp_path), resume_round=1)
  events = tmp_path / f"events.out.tfevents.1.host{writers.EVENTS_SUFFIX}"
  os.mkdir(events)
  with pytest.raises(WorkdirError, match=r"tfevents.*is not a file: move it away"):
    writers.TensorBoardWriter(str(tmp_path))


def test_lost_metrics_lines_on_resume_are_said(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger="isr_jax"):
    metric_writer.JsonlWriter(str(tmp_path / "gone"), resume_round=3)
    (tmp_path / metric_writer.METRICS_FILE).write_text('{"round": 1}\n')
    metric_writer.JsonlWriter(str(tmp_path), resume_round=3)
    metric_writer.JsonlWriter(str(tmp_path), resume_round=1)  # all there: nothing said
  said = [r.getMessage() for r in caplog.records]
  assert len(said) == 2
  assert "metrics.jsonl was missing: it starts at round 4, without the 3 rounds" in said[0]
  assert "holds rounds up to 1 only: rounds 2-3 of the checkpoint" in said[1]


def test_a_resume_is_checked_against_what_the_checkpoints_keep(tmp_path, caplog):
  # What a run leaves (train_and_evaluate keeps its config and its examples' shape
  # with every step), less config.json, and trained on 28×28 images.
  saved = json.loads(tiny("cl", num_rounds=1).to_json_best_effort())
  manager = checkpoint.checkpoint_manager(str(tmp_path), keep=2)
  checkpoint.save(manager, 1, STATE, metadata={"config": saved, "input_shape": [28, 28, 1]})
  checkpoint.close(manager)
  assert checkpoint.saved_metadata(str(tmp_path), "config") == (1, saved)
  with caplog.at_level(logging.WARNING, logger="isr_jax"), \
      pytest.raises(ConfigError, match=r"seed: 0 → 1"):
    train_and_evaluate(tiny("cl", num_rounds=2, seed=1), str(tmp_path))
  assert any("config.json was missing: recovered from the checkpoint of round 1"
             in r.getMessage() for r in caplog.records)
  assert workdir.read_json(str(tmp_path / "config.json")) == saved
  # The same config, other data: said before any restore is tried.
  with pytest.raises(ConfigError, match=r"dataset\.name='digits' gave examples of shape 8×8×1, "
                     r"but the checkpoint of round 1 in .* was trained on 28×28×1: check "
                     r"dataset\.data_dir"):
    train_and_evaluate(tiny("cl", num_rounds=2), str(tmp_path))


def test_settings_that_would_be_ignored_are_refused():
  with pytest.raises(ConfigError, match=r"dataset\.image_size=\(32, 32\) is read only by "
                     r"segmentation datasets .*dataset\.name='digits'"):
    validate(tiny("cl", **{"dataset.image_size": (32, 32)}))
  with pytest.raises(ConfigError, match=r"fl\.num_clients=6 exceeds the 5 examples"):
    partition(np.arange(5) % 2, 6, "iid", seed=0)


def test_personal_metrics_of_no_client_are_refused_or_nan():
  train, _, info = digits()
  config = tiny("fl", **{"fl.num_clients": 20, "fl.client_test_fraction": 0.001})
  with pytest.raises(ConfigError, match=r"fl\.client_test_fraction=0\.001 leaves every "
                     r"client's own test split empty \(clients hold \d+-\d+ examples\)"):
    _partition_fl(config, train, info, np.arange(len(train.y)), held_out=True)
  stats = client_accuracy_stats(jnp.zeros(3), jnp.zeros(3))
  assert float(stats["clients"]) == 0
  assert all(np.isnan(float(stats[k]))
             for k in ("accuracy_mean", "accuracy_std", "accuracy_weighted"))


def test_a_personalized_algorithm_evaluated_only_globally_is_said(caplog):
  config = tiny("fl", **{"fl.algorithm": "fedper", "fl.personalized_eval": "off"})
  with caplog.at_level(logging.WARNING, logger="isr_jax"):
    build_experiment(config)
  assert any("fl.personalized_eval=off with fedper, a personalized algorithm" in r.getMessage()
             for r in caplog.records)


def test_errors_of_abandoned_orbax_reads_are_not_printed(monkeypatch):
  # After a step failed to read, its other reads end later, even at exit, and printed
  # "Exception ignored in: <coroutine object _read_array_index_and_device_put ...>".
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoint._quiet_orphaned_reads()
  orbax_read = types.SimpleNamespace(
      cr_code=types.SimpleNamespace(co_filename=f"{os.sep}orbax{os.sep}serialization.py"))
  for obj, error in ((orbax_read, ValueError("DATA_LOSS")),
                     (None, RuntimeError("Event loop is closed")), (None, ValueError("mine"))):
    sys.unraisablehook(types.SimpleNamespace(object=obj, exc_value=error))
  assert [str(u.exc_value) for u in seen] == ["mine"]
