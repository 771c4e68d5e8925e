"""A run a researcher can leave alone: resume checks, damaged files, full disks, finished runs."""

import errno
import gzip
import json
import logging
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import tiny

from isr_jax import checkpoint, metric_writer, workdir
from isr_jax.config import default_config, resume_changes, saved_config, validate
from isr_jax.data import load_dataset
from isr_jax.errors import ConfigError, WorkdirBusy, WorkdirError
from isr_jax.metric_writer import read_metrics
from isr_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(__file__))


def snapshot(path):
  """Every file under ``path`` with its bytes and mtime: what "changed nothing" compares.

  The workdir's lock file is left out: every run that opens the workdir holds it.
  """
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      if f == workdir.LOCK_FILE:
        continue
      p = os.path.join(root, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = (fh.read(), os.stat(p).st_mtime_ns)
  return out


def test_resume_refuses_a_changed_config_and_accepts_safe_changes(tmp_path):
  train_and_evaluate(tiny("fl", num_rounds=2), str(tmp_path))
  before = snapshot(tmp_path)
  changed = tiny("fl", num_rounds=3, seed=1, **{"fl.algorithm": "fedprox",
                                                  "client_optimizer.learning_rate": 0.1})
  with pytest.raises(ConfigError) as info:
    train_and_evaluate(changed, str(tmp_path))
  message = str(info.value)
  assert "\n" not in message
  for change in ("client_optimizer.learning_rate: 0.05 → 0.1", "fl.algorithm: 'fedavg' → "
                 "'fedprox'", "seed: 0 → 1"):
    assert change in message
  assert "num_rounds" not in message.split("(only")[0]  # a safe change is not blamed
  assert snapshot(tmp_path) == before  # config.json, metrics, checkpoints untouched

  # Only safe settings differ: the run goes ahead and config.json records them.
  safe = tiny("fl", num_rounds=3, eval_every=3, checkpoint_every=3, keep_checkpoints=3,
              **{"dataset.data_dir": str(tmp_path), "logging.plots": False})
  result = train_and_evaluate(safe, str(tmp_path))
  assert [r["round"] for r in result["history"]] == [1, 2, 3]
  with open(tmp_path / "config.json") as f:
    saved = json.load(f)
  assert (saved["num_rounds"], saved["eval_every"], saved["dataset"]["data_dir"]) == (
      3, 3, str(tmp_path))


def test_a_config_saved_before_newer_settings_existed_still_resumes():
  """A library upgrade adds settings; the runs it finds on disk must still resume."""
  new = default_config()
  new.fl.algorithm = "fednova"
  saved = json.loads(new.to_json_best_effort())
  # Written before personalized FL and SCAFFOLD's momentum correction existed.
  for name in ("ditto", "fedaims", "fedaims_full", "fedala", "fedbabu", "fedrep", "fedrod",
               "personalized_eval", "client_test_fraction"):
    del saved["fl"][name]
  del saved["fl"]["scaffold"]["momentum_correction"]
  assert resume_changes(saved, new) == ([], False)
  # A SCAFFOLD run of then took the literal step: resuming it under the new default
  # would change what its rounds compute.
  new.fl.algorithm = saved["fl"]["algorithm"] = "scaffold"
  assert resume_changes(saved, new)[0] == [
      "fl.scaffold.momentum_correction: 'full' → 'scaled'"]
  new.fl.scaffold.momentum_correction = "full"
  assert resume_changes(saved, new) == ([], False)
  # Another algorithm's section is never read by this run: not compared.
  saved["fl"]["ditto"] = {"lam": 0.5, "personal_epochs": 5}
  assert resume_changes(saved, new) == ([], False)


def test_a_finished_run_is_reported_and_nothing_changes(tmp_path, caplog):
  first = train_and_evaluate(tiny("fl", num_rounds=2), str(tmp_path))
  # Kept with each step too, for a resume whose config.json was lost.
  assert checkpoint.saved_metadata(str(tmp_path), "config") == (
      2, workdir.read_json(str(tmp_path / "config.json")))
  assert checkpoint.saved_metadata(str(tmp_path), "input_shape") == (2, [8, 8, 1])
  before = snapshot(tmp_path)
  with caplog.at_level(logging.INFO, logger="isr_jax"):
    again = train_and_evaluate(tiny("fl", num_rounds=2), str(tmp_path))
  assert snapshot(tmp_path) == before
  assert again["finished_earlier"] and again["compile_s"] == 0.0  # not compiled, not trained
  assert not first["finished_earlier"]
  assert again["metrics"] == first["metrics"]  # train/, comm/, fl/ keys included
  assert any("finished round 2 already" in r.getMessage() for r in caplog.records)
  chex.assert_trees_all_equal(again["state"].params, first["state"].params)
  # Fewer rounds than were trained is finished too.
  assert train_and_evaluate(tiny("fl", num_rounds=1), str(tmp_path))["metrics"] == \
      first["metrics"]
  assert snapshot(tmp_path) == before


def test_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, caplog):
  train_and_evaluate(tiny("cl", num_rounds=2), str(tmp_path))
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:
    f.write('{"round": 3, "train/lo')  # what a kill in the middle of a write leaves
  with caplog.at_level(logging.WARNING, logger="isr_jax"):
    assert [r["round"] for r in read_metrics(str(path))] == [1, 2]
  assert sum("torn last line" in r.getMessage() for r in caplog.records) == 1
  result = train_and_evaluate(tiny("cl", num_rounds=3), str(tmp_path))
  assert [r["round"] for r in result["history"]] == [1, 2, 3]
  assert path.read_text().endswith("}\n")


def test_damage_before_the_last_metrics_line_is_one_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 1}\n{"round": 2, "x\n{"round": 3}\n')
  with pytest.raises(WorkdirError, match=r"metrics\.jsonl line 2 is damaged"):
    read_metrics(str(path))


def test_metrics_are_appended_in_one_write_per_line(tmp_path, monkeypatch):
  writes = []
  real = os.write
  monkeypatch.setattr(metric_writer.os, "write", lambda fd, b: writes.append(b) or real(fd, b))
  writer = metric_writer.JsonlWriter(str(tmp_path), echo=False)
  writer.write(1, {"train/loss": 0.5})
  writer.write(2, {"train/loss": float("nan")})
  assert [w.count(b"\n") for w in writes] == [1, 1]
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [1, 2]


def damage(step_dir, how):
  if how == "empty":
    for root, dirs, files in os.walk(step_dir, topdown=False):
      for f in files:
        os.remove(os.path.join(root, f))
      for d in dirs:
        os.rmdir(os.path.join(root, d))
    return
  for root, _, files in os.walk(step_dir):
    for f in files:
      if "/d/" in os.path.join(root, f) or "manifest" in f:  # the array data
        with open(os.path.join(root, f), "r+b") as fh:
          fh.truncate(7)


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog, how):
  config = tiny("cl", num_rounds=3, keep_checkpoints=3)
  straight = train_and_evaluate(tiny("cl", num_rounds=4), str(tmp_path / "straight"))
  train_and_evaluate(config, str(tmp_path / "run"))
  ckpts = tmp_path / "run" / "checkpoints"
  damage(ckpts / "3", how)
  kept = snapshot(ckpts / "3")
  with caplog.at_level(logging.WARNING, logger="isr_jax"):
    resumed = train_and_evaluate(tiny("cl", num_rounds=4, keep_checkpoints=3),
                                 str(tmp_path / "run"))
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert len(lines) == 1 and "round 3 skipped" in lines[0] and "resuming from round 2" in lines[0]
  assert ("empty directory" if how == "empty" else "unreadable files") in lines[0]
  assert "tensorstore" not in lines[0].lower()
  assert snapshot(ckpts / "3.damaged") == kept  # moved aside, never deleted or changed
  assert [r["round"] for r in resumed["history"]] == [1, 2, 3, 4]
  chex.assert_trees_all_equal(resumed["state"], straight["state"])


def test_workdir_that_is_a_file_or_read_only_is_one_line(tmp_path, monkeypatch):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(WorkdirError, match=r"is a file, not a directory"):
    train_and_evaluate(tiny("cl", num_rounds=1), str(afile))

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))

  monkeypatch.setattr(workdir.tempfile, "TemporaryFile", read_only)
  with pytest.raises(WorkdirError, match=r"Read-only file system — remount it read-write or "
                     "use another --workdir") as info:
    train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path / "ro"))
  assert "\n" not in str(info.value)
  assert os.listdir(tmp_path / "ro") == []


def test_disk_full_while_writing_metrics_or_checkpoints_is_one_line(tmp_path, monkeypatch):
  train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))
  before = snapshot(tmp_path)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with monkeypatch.context() as m:
    m.setattr(metric_writer.os, "write", full)
    with pytest.raises(WorkdirError, match=r"metrics\.jsonl: No space left on device") as info:
      train_and_evaluate(tiny("cl", num_rounds=2), str(tmp_path))
    assert "\n" not in str(info.value)
  def tensorstore_full(*args, **kwargs):  # how Orbax's writer reports it: text, not errno
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.model.conv1.kernel/0.0.0.0": '
                     "Failed writing: [OS error: No space left on device]")

  with monkeypatch.context() as m:
    m.setattr(ocp.CheckpointManager, "save", tensorstore_full)
    with pytest.raises(WorkdirError, match=r"checkpoints: No space left on device — free some"):
      train_and_evaluate(tiny("cl", num_rounds=2), str(tmp_path))
  after = snapshot(tmp_path)
  for name, (content, _) in before.items():  # nothing written before was lost
    if name == "config.json":  # records num_rounds=2, a safe change, before the first save
      continue
    if name.startswith("events.out.tfevents"):  # rebuilt from metrics.jsonl on every resume
      continue
    assert after[name][0].startswith(content) if name == "metrics.jsonl" else \
        after[name][0] == content, name
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [1, 2]  # round 2 before its save
  # Space again: the run resumes from round 1, as nothing was lost.
  assert [r["round"] for r in train_and_evaluate(tiny("cl", num_rounds=2),
                                                 str(tmp_path))["history"]] == [1, 2]


def test_an_atomic_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
  path = str(tmp_path / "summary.json")
  workdir.write_json(path, {"round": 1})
  monkeypatch.setattr(workdir.os, "fsync", lambda fd: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, "No space left on device")))
  with pytest.raises(WorkdirError, match="No space left on device"):
    workdir.write_json(path, {"round": 2})
  assert workdir.read_json(path) == {"round": 1}
  assert os.listdir(tmp_path) == ["summary.json"]


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.mark.parametrize(
    "train_labels,num_test,message",
    [
        ([0] * 20, 5, r"every training label of dataset\.name='fashion_mnist' is class 0"),
        (list(range(10)) * 2, 0, r"dataset\.name='fashion_mnist' has an empty test split: "
         r"check the files it was read from \("),
    ],
)
def test_one_class_or_empty_splits_blame_the_data(tmp_path, train_labels, num_test, message):
  rng = np.random.default_rng(0)
  n = len(train_labels)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (num_test, 28, 28)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [1] * num_test)
  with pytest.raises(ConfigError, match=message) as info:
    load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)


def test_main_is_one_line_for_a_config_typo_and_damaged_checkpoints(tmp_path):
  base = [sys.executable, "-m", "experiments.main",
          "--config=experiments/configs/digits.py:fl,local", f"--workdir={tmp_path}"]
  typo = subprocess.run(base + ["--config.fl.algoritm=fedprox"], capture_output=True, text=True,
                        cwd=REPO, timeout=300)
  assert typo.returncode == 1
  assert typo.stderr.strip() == ("error: --config.fl.algoritm: the config has no setting "
                                 "'algoritm'; did you mean 'algorithm'?")
  subprocess.run(base, capture_output=True, cwd=REPO, timeout=300, check=True)
  for step in ("2", "4"):
    damage(tmp_path / "checkpoints" / step, "truncated")
  # Failed reads leave TensorStore callbacks behind that used to print "Event
  # loop is closed" tracebacks after the error line (racy, so not every time).
  proc = subprocess.run(base, capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 1
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith("error: no checkpoint in ") and "round 4: unreadable" in lines[-1]
  assert not any(w in proc.stderr for w in ("Traceback", "Event loop", "Future exception"))


def test_signal_handlers_are_restored_after_a_run(tmp_path):
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))
  assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_run_on_the_same_workdir_is_one_line_and_writes_nothing(tmp_path):
  with workdir.exclusive(str(tmp_path)):
    with (pytest.raises(WorkdirBusy, match=f"in use by process {os.getpid()} on "),
          workdir.exclusive(str(tmp_path))):
      pass
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.main",
         "--config=experiments/configs/digits.py:fl,local", f"--workdir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 1
    assert re.fullmatch(
        re.escape(f"error: {tmp_path} is in use by process {os.getpid()} on "
                  f"{socket.gethostname()} since ") + r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
        + re.escape(": wait for that run to end, or use another --workdir"),
        proc.stderr.strip().splitlines()[-1])
    assert snapshot(tmp_path) == before
  # Released with its holder, even one killed with SIGKILL (the kernel drops the flock).
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from isr_jax import workdir\n"
       f"with workdir.exclusive({str(tmp_path)!r}):\n  print('held', flush=True); time.sleep(60)"],
      stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    ready, _, _ = select.select([holder.stdout], [], [], 120)
    assert ready and holder.stdout.readline().strip() == "held"
    with (pytest.raises(WorkdirBusy, match=f"process {holder.pid} "),
          workdir.exclusive(str(tmp_path))):
      pass
  finally:
    holder.kill()
    holder.wait()
  with workdir.exclusive(str(tmp_path)):
    pass


def test_a_config_saved_before_newer_settings_is_rebuilt_as_that_run_computed():
  saved = json.loads(default_config().to_json_best_effort())
  del saved["isr"]["decouple_adapters"]
  del saved["fl"]["fedaims"]["absent_classes"]
  del saved["logging"]  # a whole section the file predates: today's defaults
  config = saved_config(saved)
  validate(config)
  assert config.isr.decouple_adapters is False  # SETTINGS_ADDED_LATER: what the run computed
  assert config.fl.fedaims.absent_classes == "zero"
  assert config.logging.progress is True
  as_json = lambda c: json.loads(c.to_json_best_effort())  # noqa: E731
  assert as_json(saved_config(as_json(default_config()))) == as_json(default_config())
