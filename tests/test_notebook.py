"""notebooks/ run end to end, as a Colab user would run them top to bottom."""

import os
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOUR = os.path.join(REPO, "notebooks", "isr_jax_tour.ipynb")


def test_tour_notebook_runs_end_to_end(tmp_path, monkeypatch):
  # The kernel is a child process: it inherits these. PYTHONPATH makes it import
  # this checkout (not another install), so its install cell is skipped and needs
  # no network; the workdirs go to pytest's temporary tree.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
  monkeypatch.setenv("ISR_JAX_TOUR_DIR", str(tmp_path))
  nb = nbformat.read(TOUR, as_version=4)
  t0 = time.perf_counter()
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  print(f"notebook ran in {time.perf_counter() - t0:.0f}s")

  outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []))
             for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "round 6/6 (100%)" in text  # progress reached the notebook
  assert "with ISR" in text and "FedAvg-clip + ISR: test accuracy" in text
  assert "panels: ('test/accuracy'" in text and "'hybrid/cos_cl_fl')" in text
  images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get(
      "data", {})]
  assert len(images) == 2  # the run's curves and the grid overlay
  for name in ("cl", "cl_isr", "fl", "fl_isr", "hybrid", "hybrid_isr", "fedavg_clip_isr"):
    assert os.path.exists(tmp_path / name / "metrics.jsonl"), name
