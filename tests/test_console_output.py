"""What the console shows: a run's headline, its progress lines, a grid's lines, a stop."""

import logging
import os
import signal
import subprocess
import sys

import pytest
from support import driver_env

from experiments.reporting import GridProgress, one_line_stops
from isr_jax import progress
from isr_jax.errors import ConfigError, Preempted

REPO = os.path.dirname(os.path.dirname(__file__))

PERSONAL = {"test/accuracy": 0.9, "test/loss": 0.3, "personal/accuracy_mean": 0.8123,
            "personal/accuracy_std": 0.05, "personal/accuracy_weighted": 0.8,
            "personal/clients": 20.0, "train/loss": 0.4}


def test_headline_puts_personal_accuracy_first_for_a_personalized_run():
  assert progress.headline(PERSONAL) == (
      "personal accuracy 0.8123 ± 0.0500 over 20 clients; global model's test accuracy 0.9000")
  assert progress.headline({"test/accuracy": 0.91234, "test/loss": 0.3}) == "test accuracy 0.9123"
  assert progress.headline({"train/loss": 0.4}) == ""  # a round without evaluation


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_progress_line_ends_with_the_latest_evaluation_and_the_run_with_its_result(caplog):
  caplog.set_level(logging.INFO, logger="isr_jax")
  clock = FakeClock()
  report = progress.Progress(2, clock=clock)
  report.start(0)
  clock.now += 1.5
  assert report.round(1) == "round 1/2 (50%): 1.50 s/round, ETA 1.5s"
  clock.now += 1.5
  line = report.round(2, note=progress.headline(PERSONAL))
  assert line.endswith("ETA 0.0s — personal accuracy 0.8123 ± 0.0500 over 20 clients; "
                       "global model's test accuracy 0.9000")
  report.result(progress.headline(PERSONAL))
  assert caplog.records[-1].getMessage().startswith("result: personal accuracy 0.8123")


def test_grid_lines_say_which_run_trains_its_result_the_grid_eta_and_reuse(capsys):
  clock = FakeClock()
  grid = GridProgress(4, clock=clock)
  grid.start("fl_isr_seed0")
  opened = capsys.readouterr().out
  assert opened == "[1/4] fl_isr_seed0 … "  # open while the run trains
  clock.now += 30.0
  grid.finish({"finished_earlier": False, "metrics": {"test/accuracy": 0.5}})
  grid.start("fl_seed0")
  grid.finish({"finished_earlier": True, "metrics": PERSONAL})
  grid.start("cl_seed0")
  grid.skip("training in another process; skipped")
  grid.start("hybrid_seed0")
  clock.now += 10.0
  grid.finish({"finished_earlier": False, "metrics": {"test/accuracy": 0.75}})
  assert (opened + capsys.readouterr().out).splitlines() == [
      "[1/4] fl_isr_seed0 … test accuracy 0.5000 (30.0s; grid ETA 1m30s)",
      "[2/4] fl_seed0 … finished earlier, reused: personal accuracy 0.8123 ± 0.0500 over 20 "
      "clients; global model's test accuracy 0.9000",
      "[3/4] cl_seed0 … training in another process; skipped",
      "[4/4] hybrid_seed0 … test accuracy 0.7500 (10.0s)",
  ]


@pytest.mark.parametrize(("raised", "code", "message"), [
    (Preempted("SIGTERM received: stopped after round 3, saved in w/3 — run the same command "
               "to resume", signal.SIGTERM), 143,
     "stopped: SIGTERM received: stopped after round 3, saved in w/3 — run the same command "
     "to resume\n"),
    (KeyboardInterrupt(), 130, "stopped: interrupted; the runs already saved are kept and the "
                               "same command resumes the grid\n"),
])
def test_a_stop_is_one_line_and_the_signals_exit_code(capsys, raised, code, message):
  with pytest.raises(SystemExit) as e, one_line_stops():
    raise raised
  assert e.value.code == code
  assert capsys.readouterr().err == message


def test_a_user_error_in_a_grid_is_one_error_line():
  with pytest.raises(SystemExit) as e, one_line_stops():
    raise ConfigError("fl.algorithm='x' is not one of ...")
  assert e.value.code == "error: fl.algorithm='x' is not one of ..."


def test_cross_silo_driver_stops_in_one_line_on_sigint(tmp_path):
  # In a process of its own: the driver defines absl flags that other drivers share.
  script = f"""
import signal
from absl import app
from experiments import cross_silo
from isr_jax.errors import Preempted

def interrupted(config, workdir, label):
  raise Preempted("SIGINT received: stopped after round 1, saved in x", signal.SIGINT)

cross_silo.train_unless_diverged = interrupted
app.run(cross_silo.main, ["cross_silo", "--runs=classes2:fedavg:0", "--local",
                          "--workdir={tmp_path}"])
"""
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=driver_env(),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 128 + signal.SIGINT, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("stopped: SIGINT received")
  assert "Traceback" not in out.stderr
