"""Real signals to real training processes: SIGTERM, SIGINT and kill -9 during a save."""

import os
import re
import signal
import subprocess
import sys
import time

import chex
import pytest
from test_train import tiny

from isr_jax.checkpoint import saved_steps
from isr_jax.metric_writer import read_metrics
from isr_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(__file__))
WORKER = os.path.join(REPO, "tests", "workers", "train_tiny.py")
FOREVER = 100_000  # rounds: the run only ends by the signal


def rounds_written(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for line in f if line.endswith("\n"))


def wait_until(condition, proc, timeout=300):
  deadline = time.monotonic() + timeout
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f"the run ended early (rc {proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      pytest.fail("the run made no progress")
    time.sleep(0.001)


def start_worker(workdir, mode, checkpoint_every):
  return subprocess.Popen(
      [sys.executable, WORKER, str(workdir), mode, str(FOREVER), str(checkpoint_every)],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def resume_matches_a_straight_run(tmp_path, workdir, mode, num_rounds, checkpoint_every=1000):
  """Resumes ``workdir`` to ``num_rounds`` and compares with an uninterrupted run."""
  config = tiny(mode, num_rounds=num_rounds, eval_every=1000, checkpoint_every=checkpoint_every)
  resumed = train_and_evaluate(config, str(workdir))
  straight = train_and_evaluate(config, str(tmp_path / "straight"))
  assert [r["round"] for r in resumed["history"]] == list(range(1, num_rounds + 1))
  chex.assert_trees_all_equal(resumed["state"], straight["state"])
  return resumed


def test_sigterm_saves_the_round_in_progress_and_the_run_resumes_exactly(tmp_path):
  workdir = tmp_path / "run"
  proc = start_worker(workdir, "fl", checkpoint_every=FOREVER)  # no save but the signal's
  wait_until(lambda: rounds_written(workdir) >= 2, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM
  assert "Traceback" not in err
  last = err.strip().splitlines()[-1]
  match = re.fullmatch(r"stopped: SIGTERM received: stopped after round (\d+), saved in (\S+) — "
                       r"run the same command to resume", last)
  assert match, last
  done = int(match.group(1))
  assert match.group(2) == os.path.join(str(workdir), "checkpoints", str(done))
  assert saved_steps(str(workdir)) == [done]
  assert [r["round"] for r in read_metrics(str(workdir))] == list(range(1, done + 1))
  assert os.path.exists(workdir / "config.json")  # recorded with the first checkpoint
  resume_matches_a_straight_run(tmp_path, workdir, "fl", done + 2)


def test_sigint_from_the_command_line_is_one_line_and_resumes(tmp_path):
  command = [sys.executable, "-m", "experiments.main",
             "--config=experiments/configs/digits.py:cl,local", f"--workdir={tmp_path}",
             f"--config.eval_every={FOREVER}", f"--config.checkpoint_every={FOREVER}"]
  proc = subprocess.Popen(command + [f"--config.num_rounds={FOREVER}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=REPO)
  wait_until(lambda: rounds_written(tmp_path) >= 1, proc)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  last = err.strip().splitlines()[-1]
  assert re.fullmatch(r"stopped: SIGINT received: stopped after round \d+, saved in \S+ — run "
                      r"the same command to resume", last), last
  done = saved_steps(str(tmp_path))[-1]
  again = subprocess.run(command + [f"--config.num_rounds={done + 1}"], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resuming {tmp_path} from round {done}" in again.stderr
  assert [r["round"] for r in read_metrics(str(tmp_path))] == list(range(1, done + 2))


def test_kill_9_during_an_asynchronous_save_resumes_exactly(tmp_path):
  workdir = tmp_path / "run"
  proc = start_worker(workdir, "fl", checkpoint_every=1)  # a save after every round
  ckpts = workdir / "checkpoints"

  def saving():  # Orbax writes a step into "<round>.orbax-checkpoint-tmp-*" and renames it
    names = os.listdir(ckpts) if ckpts.exists() else []
    return rounds_written(workdir) >= 40 or (
        any(n.isdigit() for n in names) and any("tmp" in n for n in names))

  wait_until(saving, proc)
  proc.kill()
  proc.wait()
  steps = saved_steps(str(workdir))
  assert steps, "no checkpoint was finished before the kill"
  # Saving every round again also saves over the unfinished step the kill left behind.
  resume_matches_a_straight_run(tmp_path, workdir, "fl", max(steps) + 2, checkpoint_every=1)
  assert not any(n.endswith(".damaged") for n in os.listdir(ckpts))  # nothing was torn


def test_a_stop_in_the_last_round_finishes_the_run_then_stops_its_caller(tmp_path, monkeypatch):
  """The run is complete and saved; a grid that called it stops instead of going on."""
  from isr_jax import checkpoint
  from isr_jax.errors import Preempted

  save = checkpoint.save

  def save_then_signal(*args, **kwargs):  # SIGTERM arrives while the last round is saved
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint, "save", save_then_signal)
  with pytest.raises(Preempted, match=r"SIGTERM received during the last round: the run "
                                      r"finished round 1 and was saved") as info:
    train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))
  assert info.value.signum == signal.SIGTERM
  assert saved_steps(str(tmp_path)) == [1] and os.path.exists(tmp_path / "summary.json")
  monkeypatch.setattr(checkpoint, "save", save)
  assert train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))["finished_earlier"]
