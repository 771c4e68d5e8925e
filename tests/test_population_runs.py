"""Runs whose clients live on the host (fl.population.placement host / file): the same
run as on the device, chosen automatically by size, resumed where the checkpoints put
the clients, and exact after kill -9 with the rows in files."""

import os
import subprocess
import sys

import chex
import numpy as np
import pytest
from test_preemption import REPO, WORKER, rounds_written, wait_until
from test_train import tiny

from experiments.finished_runs import load_run
from isr_jax.checkpoint import saved_steps
from isr_jax.client_results import read_per_client
from isr_jax.errors import ConfigError
from isr_jax.fl.placement import STATE_DIR
from isr_jax.metric_writer import read_metrics
from isr_jax.train import train_and_evaluate

PERSONAL = {"fl.algorithm": "fedper"}


def run(tmp_path, name, **overrides):
  settings = {"num_rounds": 4, "eval_every": 2, "checkpoint_every": 2, **PERSONAL, **overrides}
  config = tiny("fl", **settings)
  return train_and_evaluate(config, str(tmp_path / name))


def without_time(history):
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in history]


def test_host_and_file_placements_train_the_run_the_device_trains(tmp_path):
  device = run(tmp_path, "device", **{"fl.population.placement": "device"})
  for placement in ("host", "file"):
    result = run(tmp_path, placement, **{"fl.population.placement": placement})
    assert result["experiment"].placement == placement
    assert without_time(result["history"]) == without_time(device["history"])
    assert "personal/accuracy_mean" in result["history"][-1]
    chex.assert_trees_all_equal(result["state"], device["state"]._replace(client_states={}))
    ours, theirs = (read_per_client(str(tmp_path / n)) for n in (placement, "device"))
    assert ours == theirs
    assert os.listdir(tmp_path / placement / STATE_DIR / "rows")  # the rows are on disk


def test_auto_moves_the_population_off_the_device_above_the_limit(tmp_path):
  small = run(tmp_path, "small", num_rounds=1)
  assert small["experiment"].placement == "device"
  large = run(tmp_path, "large", num_rounds=1, **{"fl.population.dense_limit_gib": 1e-6})
  assert large["experiment"].placement == "host"


def test_a_resume_keeps_the_placement_of_its_checkpoints(tmp_path):
  run(tmp_path, "run", num_rounds=2, **{"fl.population.placement": "file"})
  resumed = run(tmp_path, "run", **{"fl.population.placement": "auto"})
  assert resumed["experiment"].placement == "file"
  straight = run(tmp_path, "straight", **{"fl.population.placement": "file"})
  chex.assert_trees_all_equal(resumed["state"], straight["state"])
  with pytest.raises(ConfigError, match=r"fl.population.placement='device'.*placement 'file'"):
    run(tmp_path, "run", num_rounds=6, **{"fl.population.placement": "device"})
  finished = load_run(str(tmp_path / "run"))  # what the measurements of finished runs read
  assert finished.experiment.placement == "file"
  chex.assert_trees_all_equal(finished.state.params, straight["state"].params)


def test_kill_9_with_the_rows_in_files_resumes_exactly(tmp_path):
  workdir = tmp_path / "run"
  settings = ["fl.algorithm=fedper", "fl.population.placement=file"]
  proc = subprocess.Popen([sys.executable, WORKER, str(workdir), "fl", "100000", "1", *settings],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  wait_until(lambda: rounds_written(workdir) >= 5, proc)
  proc.kill()
  proc.wait()
  done = max(saved_steps(str(workdir)))
  rows = workdir / STATE_DIR / "rows"
  written = {int(f.split(".")[1]) for d in os.listdir(rows) for f in os.listdir(rows / d)}
  assert max(written) >= done  # the kill came after rows of round `done` were written
  config = tiny("fl", num_rounds=done + 2, eval_every=1000, checkpoint_every=1, **PERSONAL,
                **{"fl.population.placement": "file"})
  resumed = train_and_evaluate(config, str(workdir))
  straight = train_and_evaluate(config, str(tmp_path / "straight"))
  assert [r["round"] for r in read_metrics(str(workdir))] == list(range(1, done + 3))
  chex.assert_trees_all_equal(resumed["state"], straight["state"])
  np.testing.assert_array_equal(
      [r["train/loss"] for r in resumed["history"]], [r["train/loss"] for r in straight["history"]])
