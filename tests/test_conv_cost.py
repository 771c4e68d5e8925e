"""benchmarks/conv_cost.py: both sides time the same three operations, and the table prints."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax import lax
from support import driver_env

from isr_jax.models import create_model
from isr_jax.nn.conv import Conv

torch = pytest.importorskip("torch")
from benchmarks import conv_cost, torch_baseline  # noqa: E402  (skip without torch)

REPO = os.path.dirname(os.path.dirname(__file__))


def _reference(name, op, x, kernel, dy):
  pad = conv_cost.CONVS[name][5]

  def conv(v, k):
    return lax.conv_general_dilated(v, k, (1, 1), [(pad, pad)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  if op == "forward":
    return conv(x, kernel)
  _, pullback = jax.vjp(conv, x, kernel)
  return pullback(dy)[0 if op == "input_grad" else 1]


def test_table_of_convolutions_is_what_the_models_build(monkeypatch):
  # CONVS is written out by hand; every entry must be the model's own layer at 28×28×1,
  # with the input it sees there and an output of the same size.
  seen = {}
  convolve = Conv.convolve

  def recording(self, x):
    y = convolve(self, x)
    seen.setdefault(current, []).append((x.shape[1:], self.kernel.shape, y.shape[1:3]))
    return y

  monkeypatch.setattr(Conv, "convolve", recording)
  for current, options in (("fedavg_cnn", {}), ("lenet5", {}), ("convnet3", {"width": 32})):
    model = create_model(current, num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0),
                         **options)
    model(np.zeros((1, 28, 28, 1), np.float32))
  for name, (h, w, cin, cout, k, _) in conv_cost.CONVS.items():
    model_name, index = name.split(".conv")
    built = seen["convnet3" if model_name == "convnet" else model_name]
    x_shape, kernel_shape, out_hw = built[int(index) - 1]
    assert (x_shape, kernel_shape) == ((h, w, cin), (k, k, cin, cout)), name
    assert out_hw == conv_cost.conv_operands(name, batch=1)[2].shape[1:3], name


@pytest.mark.parametrize("name", conv_cost.CONVS)
def test_each_side_computes_the_operation_it_names(name):
  x, kernel, dy = conv_cost.conv_operands(name, batch=2)
  for op in conv_cost.OPS:
    want = np.asarray(_reference(name, op, x, kernel, dy))
    scale = np.abs(want).max()
    for impl in ("auto", "xla_cpu"):
      got = jax.jit(conv_cost.jax_operation(name, impl, op))(x, kernel, dy)
      np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * scale, err_msg=(impl, op))
    # One iteration of the PyTorch loop adds one result to a zero total (NCHW / OIHW).
    total = torch_baseline.torch_conv_loop(op, x, kernel, dy, conv_cost.CONVS[name][5], 1)()
    layout = (0, 2, 3, 1) if op != "kernel_grad" else (2, 3, 1, 0)
    np.testing.assert_allclose(total.numpy().transpose(layout), want, atol=1e-5 * scale,
                               err_msg=("torch", op))


@pytest.mark.parametrize("op", conv_cost.OPS)
def test_timed_call_runs_the_operation_every_iteration(op):
  # The drift that keeps XLA from hoisting the operation is far below float32's
  # resolution, so three iterations add up to three results.
  operands = conv_cost.conv_operands("fedavg_cnn.conv2", batch=2)
  want = 3 * np.asarray(_reference("fedavg_cnn.conv2", op, *operands))
  got = conv_cost.jax_timed_call("fedavg_cnn.conv2", "auto", op, operands, iterations=3)()
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


def test_table_end_to_end():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.conv_cost", "--convs=lenet5.conv2", "--batches=2",
       "--iterations=2", "--repeats=1", "--impls=auto,xla_cpu"],
      capture_output=True, text=True, cwd=REPO, timeout=600, env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [line for line in proc.stdout.splitlines() if line.startswith("| lenet5.conv2 |")]
  assert [row.split(" | ")[2] for row in rows] == list(conv_cost.OPS)
  assert all(row.count("|") == 8 and row.count("×") == 1 for row in rows)


def test_unknown_lowering_is_a_usage_error():
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.conv_cost", "--impls=fft"],
      capture_output=True, text=True, cwd=REPO, timeout=600, env=driver_env())
  assert proc.returncode != 0 and "--impls ['fft'] not among" in proc.stderr
