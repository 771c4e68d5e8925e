"""benchmarks/torch_baseline.py: the PyTorch loops run in a process of their own, without JAX."""

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
from benchmarks import torch_baseline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(__file__))


def test_module_imports_no_jax():
  code = ("import sys, benchmarks.torch_baseline; "
          "print(sorted(m for m in sys.modules if m.startswith(('jax', 'flax'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       check=True).stdout
  assert out.strip() == "[]"


@pytest.mark.parametrize("tuned", [False, True])
def test_child_process_runs_rounds_and_reports_seconds(tuned):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 4, 8, 8, 1), dtype=np.float32)
  y = rng.integers(0, 10, (2, 3, 4)).astype(np.int32)
  run = torch_baseline.TorchProcess("round", "small_cnn", x, y, tuned_malloc=tuned)
  try:
    seconds = [run(), run()]
  finally:
    status = run.close()
  assert all(0 < s < 60 for s in seconds)
  assert status == 0


def test_rows_are_the_default_process_then_the_tuned_one():
  x = np.zeros((1, 1, 2, 8, 8, 1), np.float32)
  rows = torch_baseline.torch_rows("round", "small_cnn", x, np.zeros((1, 1, 2), np.int32))
  try:
    assert [label.endswith("glibc malloc tuned") for label, _ in rows] == [False, True]
    assert all(run() > 0 for _, run in rows)
  finally:
    for _, run in rows:
      run.close()


def test_a_child_that_dies_is_a_clear_error():
  with pytest.raises(RuntimeError, match="PyTorch child process exited"):
    torch_baseline.TorchProcess("round", "no_such_model", np.zeros((1, 1, 1, 8, 8, 1)),
                                np.zeros((1, 1, 1), np.int32))
