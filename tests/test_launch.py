"""launch/paper_schedules.sh end to end at its tiny size (the GPU run's smoke test)."""

import json
import os
import subprocess

from support import driver_env

from experiments.sweeps import expand
from experiments.sweeps import fedaims as fedaims_sweep
from experiments.sweeps import fedsol as fedsol_sweep

REPO = os.path.dirname(os.path.dirname(__file__))
SCRIPT = os.path.join(REPO, "launch", "paper_schedules.sh")


def test_paper_schedules_tiny_runs_both_tables_and_writes_one_report(tmp_path):
  # One run per table, so that the test costs two trainings and their compiles.
  env = {**driver_env(), "PARALLEL": "1", "ONLY": "^dir01-(fedaims|fedsol)-"}
  out = subprocess.run([SCRIPT, str(tmp_path), "tiny"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = (tmp_path / "REPORT.md").read_text()
  for block in ("fedaims_paper_local/table", "fedaims_paper_local/setup",
                "fedsol_paper_local/table"):
    assert f"## {block}" in report
  assert "| Dir(0.1) | FedAIMS |" in report and "| Dir(0.1) | FedSoL (ρ = 2.0, paper) |" in report
  for sweep in (fedaims_sweep.get_sweep("paper,local"), fedsol_sweep.get_sweep("paper,local")):
    assert f"1 of {len(expand(sweep))} runs finished" in report
  assert (tmp_path / "figures" / "fedaims_paper_local.png").exists()
  assert json.loads((tmp_path / "fedsol" / "dir01-fedsol-seed0" / "flatness.json").read_text())
  device = json.loads((tmp_path / "device.json").read_text())
  assert device["platform"] == "cpu" and device["wall_s"] >= 0


def test_paper_schedules_refuses_an_unknown_size(tmp_path):
  out = subprocess.run([SCRIPT, str(tmp_path), "huge"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 2
  assert out.stderr.strip() == "error: the second argument is 'tiny' or nothing, not 'huge'"
