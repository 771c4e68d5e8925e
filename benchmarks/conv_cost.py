r"""Cost of one convolution's forward pass, input gradient and kernel gradient, per lowering.

  python -m benchmarks.conv_cost                                      # every layer, batch 32 and 64
  python -m benchmarks.conv_cost --convs=fedavg_cnn.conv2 --batches=64 --repeats=9
  taskset -c 0 python -m benchmarks.conv_cost --convs=fedavg_cnn.conv2 --batches=64  # one core

A training step (``benchmarks.step_cost``) is three convolutions per layer: the
forward pass, the gradient with respect to its input and the one with respect
to its kernel. This times each of them alone, for the convolutions of the
benchmark models at 28×28×1 (:data:`CONVS`), with every lowering of
:class:`isr_jax.nn.conv.Conv` asked for (``--impls``; ``auto`` is what the
models use on CPU) against PyTorch's (``conv2d`` and
``aten.convolution_backward``, oneDNN on CPU) in a process of its own with
glibc's malloc tuned (:mod:`benchmarks.torch_baseline`: the stronger of its two
baselines; an allocator's page faults are not what this table is about).
Every timed call runs one operation ``--iterations`` times on the same operands
(isr_jax as one jitted ``fori_loop``, PyTorch as a Python loop), and both add
each result into a running total. Rows alternate, ``--repeats`` times; the
ratio is the median of per-repeat ratios. Inputs are synthetic (normal
noise): only speed is measured.

Operations alone are not a step: there XLA fuses a lowering's patch building
into the kernel that produced its input, which no row here can, so the small
layers' rows add up to more than their share of a step (benchmarks/RESULTS.md
§7.3). Compare their lowerings with each other; compare with PyTorch
in ``benchmarks.step_cost``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax import lax

from benchmarks.harness import interleaved_times, machine_description, table_header
from benchmarks.torch_baseline import TorchProcess, torch_available, torch_description
from isr_jax.nn.compiler import xla_compiler_options
from isr_jax.nn.conv import Conv
from isr_jax.nn.lowering import CONV_IMPLS

# name: (height, width, in channels, out channels, kernel size, symmetric padding), as the
# layer sees its input in the model at 28×28×1 (benchmarks.step_cost).
CONVS = {
    "fedavg_cnn.conv1": (28, 28, 1, 32, 5, 2),
    "fedavg_cnn.conv2": (14, 14, 32, 64, 5, 2),
    "lenet5.conv1": (28, 28, 1, 6, 5, 2),
    "lenet5.conv2": (14, 14, 6, 16, 5, 0),
    "convnet.conv1": (28, 28, 1, 32, 3, 1),
    "convnet.conv2": (14, 14, 32, 32, 3, 1),
}
OPS = ("forward", "input_grad", "kernel_grad")

_CONVS = flags.DEFINE_list("convs", list(CONVS), f"Layers among {list(CONVS)}.")
_BATCHES = flags.DEFINE_list("batches", ["32", "64"], "Batch sizes.", allow_override=True)
_IMPLS = flags.DEFINE_list("impls", ["auto", "xla_cpu", "im2col"],
                           f"Lowerings among {list(CONV_IMPLS)}.")
_ITERATIONS = flags.DEFINE_integer("iterations", 20, "Operations per timed call.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per row (alternating rows).",
                                allow_override=True)


def conv_operands(name: str, batch: int, seed: int = 0):
  """``x [B, H, W, C]``, ``kernel [k, k, C, D]`` and an output gradient ``dy``, NumPy."""
  h, w, cin, cout, k, pad = CONVS[name]
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, cin), np.float32)
  kernel = (rng.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
  ho, wo = h + 2 * pad - k + 1, w + 2 * pad - k + 1
  dy = rng.standard_normal((batch, ho, wo, cout), np.float32)
  return x, kernel, dy


def jax_operation(name: str, impl: str, op: str):
  """``f(x, kernel, dy)``: the layer's forward pass or one of its two gradients."""
  _, _, cin, cout, k, pad = CONVS[name]
  graphdef, state = nnx.split(
      Conv(cin, cout, k, padding=pad, use_bias=False, impl=impl, rngs=nnx.Rngs(0)))

  def conv(x, kernel):
    return nnx.merge(graphdef, jax.tree.map(lambda _: kernel, state))(x)

  if op == "forward":
    return lambda x, kernel, dy: conv(x, kernel)
  if op == "input_grad":
    return lambda x, kernel, dy: jax.vjp(lambda v: conv(v, kernel), x)[1](dy)[0]
  return lambda x, kernel, dy: jax.vjp(lambda v: conv(x, v), kernel)[1](dy)[0]


def jax_timed_call(name: str, impl: str, op: str, operands, iterations: int):
  """A compiled call running ``op`` ``iterations`` times, as one ``fori_loop``."""
  f = jax_operation(name, impl, op)
  # The operands stay in cache, as PyTorch's do in its loop and as a layer's inputs
  # are, just computed, in a training step. So that XLA cannot hoist the operation, or
  # the patches a lowering builds from its input, out of the loop, the activations it
  # reads (the input, the output gradient) move by a number below float32's resolution
  # of them (~1e-30, taken from the running total). The running total is elementwise
  # (one pass over each result, as PyTorch's loop makes): a sum into a scalar would
  # let XLA:CPU put the convolution inside its single-threaded YNNPACK reduction.
  operands = [jnp.asarray(v) for v in operands]
  moved = {"forward": (0,), "input_grad": (2,), "kernel_grad": (0, 2)}[op]
  out = jax.eval_shape(f, *operands)

  def loop(x, kernel, dy):
    def body(_, total):
      drift = 1e-30 * total.ravel()[0]
      args = [v + drift if i in moved else v for i, v in enumerate((x, kernel, dy))]
      return total + f(*args)
    return lax.fori_loop(0, iterations, body, jnp.zeros(out.shape, out.dtype))

  run = jax.jit(loop, compiler_options=xla_compiler_options()).lower(*operands).compile()
  return lambda: jax.block_until_ready(run(*operands))


def main(argv):
  del argv
  if unknown := set(_CONVS.value) - set(CONVS):
    raise app.UsageError(f"--convs {sorted(unknown)} not among {list(CONVS)}")
  if unknown := set(_IMPLS.value) - set(CONV_IMPLS):
    raise app.UsageError(f"--impls {sorted(unknown)} not among {list(CONV_IMPLS)}")
  if not torch_available():
    raise app.UsageError("PyTorch is not installed: pip install -e '.[bench]'")
  impls, n = _IMPLS.value, _ITERATIONS.value
  print(f"# Convolution cost: forward, input gradient, kernel gradient\n\n"
        f"{machine_description(torch_description() + ', glibc malloc tuned')}; {n} operations "
        f"per call, {_REPEATS.value} alternating calls per row\n\n"
        + table_header("convolution", "batch", "operation", "PyTorch ms",
                       *(f"isr_jax {impl} ms" for impl in impls),
                       f"{impls[0]} speed vs PyTorch (median [quartiles])"), flush=True)
  for name in _CONVS.value:
    for batch in (int(b) for b in _BATCHES.value):
      operands = conv_operands(name, batch)
      for op in OPS:
        pytorch = TorchProcess("conv", op, *operands, CONVS[name][5], n,
                               tuned_malloc=True)
        runs = [pytorch] + [jax_timed_call(name, impl, op, operands, n) for impl in impls]
        for run in runs[1:]:
          run()  # warm-up (the PyTorch process ran its own)
        times = interleaved_times(runs, _REPEATS.value)
        pytorch.close()
        ms = 1e3 * np.median(times, axis=1) / n
        q = times[0] / times[1]
        print(f"| {name} | {batch} | {op} | {ms[0]:.2f} | "
              + " | ".join(f"{v:.2f}" for v in ms[1:])
              + f" | {np.median(q):.2f}× [{np.percentile(q, 25):.2f}, "
              f"{np.percentile(q, 75):.2f}] |", flush=True)


if __name__ == "__main__":
  app.run(main)
