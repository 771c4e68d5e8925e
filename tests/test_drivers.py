"""The experiment drivers end to end: paired comparison and the Table III grid."""

import csv
import os
import re
import subprocess
import sys

import pytest
from support import driver_env

from experiments import compare, reporting
from experiments.configs.compare import get_config
from isr_jax.errors import NaNLossError

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def two_algorithms(tmp_path_factory):
  base = get_config("digits,local")
  workdir = str(tmp_path_factory.mktemp("compare"))
  rows = compare.summarize(compare.run_all(base, workdir, ["fedavg", "fedprox"], [0]))
  return base, workdir, rows


def test_comparison_rows_and_table(two_algorithms):
  _, _, rows = two_algorithms
  assert [(r["algorithm"], r["isr"]) for r in rows] == [
      ("fedavg", False), ("fedavg", True), ("fedprox", False), ("fedprox", True)]
  for r in rows:
    assert 0.0 <= r["accuracy"] <= 1.0 and r["diverged"] == 0
    assert r["up_MB_per_round"] > 0 and r["down_MB_per_round"] > 0
  text = compare.format_markdown(rows, "digits")
  assert "| fedprox | ✓ |" in text
  assert re.search(r"^\| fedprox \| [+-]\d\.\d{4} \|", text, re.MULTILINE)  # Δ row
  assert "/8**" in text  # 2 algorithms × 4 metrics


def test_a_diverged_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch):
  real = reporting.train_and_evaluate

  def diverge_with_isr(config, workdir):
    if config.isr.enabled:
      raise NaNLossError("train/loss became nan in round 1")
    return real(config, workdir)

  monkeypatch.setattr(reporting, "train_and_evaluate", diverge_with_isr)
  rows = compare.summarize(
      compare.run_all(get_config("digits,local"), str(tmp_path), ["fedavg"], [0]))
  off, on = rows
  assert off["diverged"] == 0 and 0.0 <= off["accuracy"] <= 1.0
  assert on["diverged"] == 1 and on["seeds"] == 0
  text = compare.format_markdown(rows, "digits")
  assert "diverged in 1 of 1 seeds" in text
  assert "**0/0**" in text  # a diverged pair is no comparison


def test_comparison_rerun_resumes_finished_runs(two_algorithms):
  base, workdir, rows = two_algorithms
  again = compare.summarize(compare.run_all(base, workdir, ["fedavg", "fedprox"], [0]))
  for a, b in zip(rows, again, strict=True):
    for key in ("accuracy", "mF1", "up_MB_per_round", "down_MB_per_round"):
      assert a[key] == b[key], key


@pytest.mark.slow
def test_segmentation_grid_end_to_end(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.segmentation_grid", "--local", "--models=deeplabv3plus",
       "--seeds=0", "--examples=2", "--cl_rounds=1", "--fl_rounds=1", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=900, env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "table3.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], r["isr"]) for r in rows] == [
      ("CL", "False"), ("CL", "True"), ("FL", "False"), ("FL", "True")]
  assert all(0.0 <= float(r["mIoU"]) <= 100.0 for r in rows)
  table = (tmp_path / "table3.md").read_text()
  assert "| synthetic_streets | deeplabv3plus |" in table and "relative reduction" in table
  assert (tmp_path / "qualitative_synthetic_streets_deeplabv3plus.png").stat().st_size > 10_000
