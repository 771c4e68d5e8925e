"""A run a researcher can leave alone: resume checks, damaged files, full disks, finished runs."""

import errno
import gzip
import logging
import os
import struct

import numpy as np
import pytest
from test_train import tiny

from isr_jax import metric_writer, workdir
from isr_jax.data import load_dataset
from isr_jax.errors import ConfigError, WorkdirError
from isr_jax.metric_writer import read_metrics
from isr_jax.train import train_and_evaluate


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
