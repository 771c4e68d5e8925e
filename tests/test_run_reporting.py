"""What a run reports around its metrics.jsonl: progress, TensorBoard, learning curves."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from test_train import tiny

from isr_jax import progress
from isr_jax.metric_writer import read_metrics
from isr_jax.plotting import CURVE_PANELS, available_panels, plot_workdirs
from isr_jax.train import train_and_evaluate
from isr_jax.writers import event_files

REPO = os.path.dirname(os.path.dirname(__file__))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tensorboard_scalars(logdir):
  """``{tag: [(step, value), ...]}`` as TensorBoard itself reads the workdir."""
  acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
  acc.Reload()
  return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tensorboard_hparams(logdir):
  """The run's hparams as TensorBoard's HPARAMS tab reads them; its config is also text."""
  acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
  acc.Reload()
  assert "config/text_summary" in acc.Tags()["tensors"]
  content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  return plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams


def assert_tensorboard_matches_jsonl(workdir):
  records = read_metrics(str(workdir))
  want = {}
  for rec in records:
    for key, value in rec.items():
      if key != "round":
        want.setdefault(key, []).append((rec["round"], value))
  got = tensorboard_scalars(workdir)
  assert sorted(got) == sorted(want)
  for tag, points in want.items():
    assert [s for s, _ in got[tag]] == [s for s, _ in points], tag  # one point per round
    assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == PNG_SIGNATURE


@pytest.fixture
def isr_jax_info(caplog):
  caplog.set_level(logging.INFO, logger="isr_jax")
  return caplog


@pytest.mark.figures
def test_a_run_reports_progress_tensorboard_and_curves(tmp_path, isr_jax_info):
  config = tiny("fl", num_rounds=3, checkpoint_every=2)
  train_and_evaluate(config, str(tmp_path))
  lines = [r.getMessage() for r in isr_jax_info.records if r.name == "isr_jax"]
  text = "\n".join(lines)
  for phase in ("loading digits and building lenet5 (fl mode, ISR off) …",
                "data and model ready in ", "compiling the round …", "round compiled in ",
                "training 3 rounds"):
    assert phase in text, phase
  progress_lines = [line for line in lines if line.startswith("round ") and "ETA" in line]
  assert [line.split(" (")[0] for line in progress_lines] == ["round 1/3", "round 2/3",
                                                              "round 3/3"]
  assert progress_lines[-1].startswith("round 3/3 (100%): ")
  assert "ETA 0.0s — test accuracy 0." in progress_lines[-1]  # the latest evaluation
  # Metrics go to the files; the console ends with the one-line result.
  assert not [line for line in lines if line.startswith(("round 1: ", "round 2: "))]
  latest = progress_lines[-1].split(" — ")[1]
  assert [line for line in lines if line.startswith("result: ")] == [f"result: {latest}"]

  assert len(event_files(str(tmp_path))) == 1
  assert_tensorboard_matches_jsonl(tmp_path)
  assert "fl/client_drift" in tensorboard_scalars(tmp_path)
  settings = tensorboard_hparams(tmp_path)  # runs compared by setting, not by folder name
  assert settings["fl.algorithm"].string_value == "fedavg"
  assert settings["num_rounds"].number_value == 3 and settings["isr.enabled"].bool_value is False

  png = tmp_path / "learning_curves.png"
  assert is_png(png)
  assert "learning curves (test/accuracy, test/loss, train/ce, fl/client_drift): " in text

  # Killed after round 3 but before its checkpoint: the resumed run computes round 3
  # again. TensorBoard must show it once, as metrics.jsonl does.
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  isr_jax_info.clear()
  train_and_evaluate(tiny("fl", num_rounds=4, checkpoint_every=2), str(tmp_path))
  assert "training rounds 3–4 of 4" in isr_jax_info.text
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
  assert len(event_files(str(tmp_path))) == 1
  assert_tensorboard_matches_jsonl(tmp_path)


@pytest.mark.figures
def test_reporting_can_be_switched_off(tmp_path, isr_jax_info):
  config = tiny("cl", num_rounds=1, **{"logging.progress": False, "logging.tensorboard": False,
                                       "logging.plots": False, "logging.verbose": True})
  train_and_evaluate(config, str(tmp_path))
  assert "ETA" not in isr_jax_info.text and "compiling the round" not in isr_jax_info.text
  assert "round 1: test/accuracy=" in isr_jax_info.text  # verbose: every round's metrics
  assert not event_files(str(tmp_path))
  assert not (tmp_path / "learning_curves.png").exists()
  assert read_metrics(str(tmp_path))  # the record itself is always written


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_rate_eta_and_cadence(isr_jax_info):
  clock = FakeClock()
  report = progress.Progress(40, clock=clock, every_secs=60.0)
  report.begin("compiling the round")
  clock.now += 12.5
  assert report.end("round compiled") == 12.5
  report.start(0)
  shown = {}
  for r in range(1, 41):
    clock.now += 2.0 if r != 7 else 70.0  # round 7 is slow: its line comes at once
    shown[r] = report.round(r)
  assert [r for r, line in shown.items() if line] == [1, 4, 7, 8, 12, 16, 20, 24, 28, 32, 36, 40]
  assert shown[1] == "round 1/40 (2%): 2.00 s/round, ETA 1m18s"
  assert shown[40] == "round 40/40 (100%): 3.70 s/round, ETA 0.0s"
  assert "compiling the round …" in isr_jax_info.text
  assert "round compiled in 12.5s" in isr_jax_info.text

  fast = progress.Progress(1000, clock=clock)
  fast.start(500)  # resumed: the rate counts this run's rounds only
  clock.now += 0.25
  assert fast.round(501) == "round 501/1000 (50%): 4.0 rounds/s, ETA 2m05s"
  assert progress.format_duration(7300) == "2h01m"


@pytest.fixture
def bare_logging(monkeypatch):
  """The ``isr_jax`` logger as a script that configured no logging has it."""
  logger = logging.getLogger("isr_jax")
  level = logger.level
  monkeypatch.setattr(logger, "handlers", [])
  logger.setLevel(logging.NOTSET)
  yield logger
  logger.setLevel(level)  # setLevel, not setattr: it also clears the loggers' level cache


def test_progress_shows_from_python_unless_the_logger_was_configured(bare_logging, monkeypatch):
  logger = bare_logging
  # Here, not in the fixture: pytest gives the root its capture handlers after set-up.
  monkeypatch.setattr(logging.root, "handlers", [])
  progress.show_progress_by_default()
  assert logger.level == logging.INFO
  assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], logging.StreamHandler)
  progress.show_progress_by_default()
  assert len(logger.handlers) == 1  # once

  monkeypatch.setattr(logger, "handlers", [])
  logger.setLevel(logging.WARNING)  # a driver that wants quiet runs (experiments/demo.py)
  progress.show_progress_by_default()
  assert logger.level == logging.WARNING and not logger.handlers


def fake_workdir(path, records):
  os.makedirs(path)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def test_panels_only_for_logged_metrics(tmp_path):
  fl = fake_workdir(tmp_path / "fl", [
      {"round": r, "train/ce": 2.0 / r, "train/loss": 2.0 / r, "fl/client_drift": 0.1 * r,
       "test/accuracy": 0.2 * r, "test/loss": 1.0 / r} for r in (1, 2, 3)])
  hybrid = fake_workdir(tmp_path / "hybrid_isr", [
      {"round": r, "train/ce": 2.0 / r, "train/loss": 2.5 / r, "hybrid/mix_weight": 0.5,
       "hybrid/cos_cl_fl": "nan" if r == 2 else 0.3} for r in (1, 2, 3)])
  assert plot_workdirs([fl], str(tmp_path / "fl.png")) == (
      "test/accuracy", "test/loss", "train/ce", "fl/client_drift")  # train/loss = train/ce
  assert is_png(tmp_path / "fl.png")
  both = plot_workdirs([fl, hybrid], str(tmp_path / "both.png"))
  assert both == tuple(m for m in CURVE_PANELS if not m.startswith("personal/"))
  assert available_panels({"a": []}) == ()
  with pytest.raises(ValueError, match="nothing to plot"):
    plot_workdirs([fl], str(tmp_path / "x.png"), metrics=["cloud/ce"])


def test_plot_command_overlays_workdirs(tmp_path):
  a = fake_workdir(tmp_path / "runs" / "a", [{"round": 1, "test/accuracy": 0.5}])
  b = fake_workdir(tmp_path / "runs" / "b", [{"round": 1, "test/accuracy": 0.6}])
  out = tmp_path / "cmp.png"
  done = subprocess.run([sys.executable, "-m", "experiments.plot", f"--workdirs={a},{b}",
                         f"--out={out}"], cwd=REPO, capture_output=True, text=True, check=True)
  assert done.stdout.strip() == f"{out}: 2 runs, panels test/accuracy"
  assert is_png(out)
