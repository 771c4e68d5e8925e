"""The Table III driver end to end."""

import csv
import json
import os
import subprocess
import sys

import pytest
from support import driver_env

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_segmentation_grid_end_to_end(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.segmentation_grid", "--local", "--models=deeplabv3plus",
       "--seeds=0", "--figure_examples=2", "--cl_rounds=1", "--fl_rounds=1",
       f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=900, env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "table3.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["setting"], r["isr"]) for r in rows] == [
      ("CL", "False"), ("CL", "True"), ("FL", "False"), ("FL", "True")]
  assert all(0.0 <= float(r["mIoU"]) <= 100.0 for r in rows)
  # Each cell trained its own loss: the ISR terms are logged exactly where ISR is on.
  for mode in ("cl", "fl"):
    for isr in ("base", "isr"):
      run = tmp_path / f"synthetic_streets_deeplabv3plus_{mode}_{isr}_seed0"
      with open(run / "metrics.jsonl") as f:
        keys = set().union(*(json.loads(line) for line in f))
      for term in ("train/mi/", "train/ne/"):
        assert any(k.startswith(term) for k in keys) == (isr == "isr"), (mode, isr, term)
  table = (tmp_path / "table3.md").read_text()
  assert "| synthetic_streets | deeplabv3plus |" in table and "relative reduction" in table
  assert (tmp_path / "qualitative_synthetic_streets_deeplabv3plus.png").stat().st_size > 10_000
