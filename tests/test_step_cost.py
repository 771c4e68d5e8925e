"""benchmarks/step_cost.py: both sides train the same architectures, and the table prints."""

import os
import subprocess
import sys

import jax
import pytest
from flax import nnx
from support import driver_env

from isr_jax.models import create_model

torch = pytest.importorskip("torch")
from benchmarks import step_cost, torch_baseline  # noqa: E402  (skip without torch)

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.parametrize("name", step_cost.MODELS)
def test_torch_models_have_the_libraries_parameter_count(name):
  width = 32
  options = {"width": width} if name.startswith("convnet") else {}
  model = create_model(name, num_classes=step_cost.NUM_CLASSES, input_shape=step_cost.SHAPE,
                       rngs=nnx.Rngs(0), **options)
  ours = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  torch_model = torch_baseline.torch_model(name, width)
  assert sum(p.numel() for p in torch_model.parameters()) == ours


def test_table_end_to_end():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.step_cost", "--models=lenet5,convnet3", "--batches=4",
       "--steps=2", "--repeats=1"], capture_output=True, text=True, cwd=REPO, timeout=600,
      env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| lenet5 |")
          or line.startswith("| convnet3 |")]
  assert len(rows) == 2 and all(row.count("|") == 8 and row.count("×") == 2 for row in rows)
