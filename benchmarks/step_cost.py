r"""Cost of one local SGD step of the small CNNs FL papers train, isr_jax against PyTorch.

  python -m benchmarks.step_cost                                  # every model, batch 32 and 64
  python -m benchmarks.step_cost --models=lenet5 --batches=64 --repeats=25

A round spends nearly all its time in local steps, so this is the number the
real-workload benchmark (``benchmarks.real_workload``) inherits. Each row runs
``--steps`` steps of SGD (lr 0.01, momentum 0.9, weight decay 1e-5 added to the
gradient, as ``torch.optim.SGD`` does) on 28×28×1 inputs: isr_jax as one jitted
``fori_loop`` over the steps (the model and compiler options the ``sequential``
round uses, without its masking and bookkeeping), PyTorch as a Python loop over
``zero_grad / forward / backward / step`` in two processes of its own
(:mod:`benchmarks.torch_baseline`: as started, and with glibc's malloc tuned).
The three rows are timed alternately, ``--repeats`` times; the ratio columns
are medians of the per-repeat ratios (this machine's speed drifts by tens of
percent within minutes, which hits every side of one repeat alike). Inputs and labels are
synthetic (uniform noise, random labels): only speed is measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax import lax

from benchmarks.harness import interleaved_times, machine_description, table_header
from benchmarks.torch_baseline import torch_available, torch_description, torch_rows
from isr_jax.models import create_model
from isr_jax.nn.compiler import xla_compiler_options

MODELS = ("lenet5", "fedavg_cnn", "convnet3", "convnet4")

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models among {list(MODELS)}.")
_BATCHES = flags.DEFINE_list("batches", ["32", "64"], "Batch sizes.")
_STEPS = flags.DEFINE_integer("steps", 50, "Local steps per timed call.")
# allow_override: the other benchmarks define --repeats too, and the tests import them all.
_REPEATS = flags.DEFINE_integer("repeats", 9, "Timed calls per row (alternating rows).",
                                allow_override=True)
_WIDTH = flags.DEFINE_integer("width", 32, "ConvNet channels (the personalized preset's).")

SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def jax_steps(name: str, x: np.ndarray, y: np.ndarray, width: int):
  """The same steps as one jitted ``fori_loop`` over the library's model."""
  options = {"width": width} if name.startswith("convnet") else {}
  model = create_model(name, num_classes=NUM_CLASSES, input_shape=SHAPE,
                       rngs=nnx.Rngs(0), **options)
  graphdef, params = nnx.split(model, nnx.Param)
  opt = optax.chain(optax.add_decayed_weights(1e-5), optax.sgd(0.01, momentum=0.9))
  xs, ys = jnp.asarray(x), jnp.asarray(y)

  def loss(p, xb, yb):
    logits, _ = nnx.merge(graphdef, p)(xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def step(t, carry):
    p, s = carry
    g = jax.grad(loss)(p, xs[t], ys[t])
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  run = jax.jit(lambda p: lax.fori_loop(0, len(x), step, (p, opt.init(p)))[0],
                compiler_options=xla_compiler_options()).lower(params).compile()
  return lambda: jax.block_until_ready(run(params))


def main(argv):
  del argv
  if unknown := set(_MODELS.value) - set(MODELS):
    raise app.UsageError(f"--models {sorted(unknown)} not among {list(MODELS)}")
  if not torch_available():
    raise app.UsageError("PyTorch is not installed: pip install -e '.[bench]'")
  batches = [int(b) for b in _BATCHES.value]
  print(f"# Local step cost, 28×28×1, SGD momentum 0.9\n\n"
        f"{machine_description(torch_description())}; {_STEPS.value} steps per call, "
        f"{_REPEATS.value} alternating calls per row; ConvNet width {_WIDTH.value}\n\n"
        + table_header("model", "batch", "PyTorch ms / step", "PyTorch, malloc tuned",
                       "isr_jax ms / step", "isr_jax speed vs PyTorch (median [quartiles] of "
                       "per-repeat ratios)", "vs PyTorch, malloc tuned"), flush=True)
  rng = np.random.default_rng(0)
  for name in _MODELS.value:
    for batch in batches:
      x = rng.uniform(size=(_STEPS.value, batch, *SHAPE)).astype(np.float32)
      y = rng.integers(0, NUM_CLASSES, size=(_STEPS.value, batch))
      pytorch = [process for _, process in torch_rows("steps", name, x, y, _WIDTH.value)]
      jax_run = jax_steps(name, x, y, _WIDTH.value)
      jax_run()  # warm-up (the PyTorch processes ran theirs)
      runs = [*pytorch, jax_run]
      times = interleaved_times(runs, _REPEATS.value)
      for process in pytorch:
        process.close()
      ms = 1e3 * np.median(times, axis=1) / _STEPS.value
      ratios = [times[i] / times[-1] for i in (0, 1)]
      print(f"| {name} | {batch} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | "
            + " | ".join(f"{np.median(q):.2f}× [{np.percentile(q, 25):.2f}, "
                         f"{np.percentile(q, 75):.2f}]" for q in ratios) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
