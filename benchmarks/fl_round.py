r"""FL round speed and memory: isr_jax's one-jit round against the sequential loops.

  python -m benchmarks.fl_round                       # every section, prints tables
  python -m benchmarks.fl_round --sections=compute,overhead --repeats=3

Sections (each compares side by side in one run, so the table reads as ratios):

* ``compute``  — FedAvg CNN (1.66 M params), 28×28×1, 10 clients × 50 local steps ×
  batch 64, SGD momentum 0.9: PyTorch's sequential loop as the seed papers write
  it (load state_dict, local SGD, average state_dicts), a Python loop of one
  jitted step per batch (fedjax's way), and the isr_jax round per strategy.
* ``overhead`` — the usual FL research setting: a small CNN on 8×8 inputs,
  batch 16, 100 clients × 20 local steps.
* ``many_clients`` — the compute-bound round with 100 clients (``--many_clients``):
  the GPU target's workload, run by default on GPU/TPU only.
* ``isr``      — round time with 0, 1, 3, 5 ISR taps (FedAvg CNN).
* ``scaling``  — round time and peak memory (each in a fresh process) for 10, 100,
  1000 clients of the small CNN and 10, 100 clients of ResNet-18, per strategy.
* ``compile``  — compile time of the round (reported with every JAX row).
* ``auto_rule`` — the evidence for ``auto``'s CPU rule
  (:func:`isr_jax.fl.client.auto_parallelism`): small CNNs at a range of local
  step costs, ``sequential`` against ``chunked`` with several chunk sizes, and
  what ``auto`` runs.

Within a section the rows are timed round-robin
(:func:`benchmarks.harness.interleaved_medians`), so
the machine's drift hits every row alike. All data is synthetic (random images
and labels): only speed is measured.
Needs ``pip install -e '.[bench]'`` (torch==2.13.0) for the PyTorch rows; PyTorch
runs in a process of its own (:mod:`benchmarks.torch_baseline`, once as started and
once with glibc's malloc tuned), on CUDA when it sees a GPU, so on a GPU machine
both sides share the device.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from benchmarks.harness import (
    interleaved_medians,
    interleaved_times,
    jax_round_runner,
    machine_description,
    strategy_label,
    table_header,
    time_jax_round,
)
from benchmarks.torch_baseline import torch_available, torch_description, torch_rows
from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.client import auto_parallelism, local_step_flops, resolve_parallelism
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.models import create_model
from isr_jax.nn.compiler import xla_compiler_options
from isr_jax.nn.lowering import resolve_conv_impl
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.taps import make_isr_spec

_SECTIONS = flags.DEFINE_list(
    "sections", None, "Which sections to run (default: compute, overhead, isr, scaling; "
    "on GPU/TPU also many_clients).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rounds per row (after one warm-up).")
_STRATEGIES = flags.DEFINE_list(
    "strategies", None,
    "isr_jax rows as client_parallelism/conv_impl, with '/xla_defaults' to compile "
    "with XLA's default options instead of isr_jax's (on CPU: YNNPACK convolutions). "
    "Default: DEFAULT_STRATEGIES of the backend.")
_MANY_CLIENTS = flags.DEFINE_integer("many_clients", 100,
                                     "Clients per round in the many_clients section.")

DEFAULT_SECTIONS = ["compute", "overhead", "isr", "scaling"]
SECTIONS = [*DEFAULT_SECTIONS, "many_clients", "auto_rule"]
DEFAULT_STRATEGIES = {
    # auto runs one of the chunked/auto and sequential/auto rows (which one depends on
    # the step's cost): the pair also shows how far two runs of one program differ.
    "cpu": ["auto/auto", "auto/auto/xla_defaults", "vmap/auto", "chunked/auto",
            "chunked/im2col", "sequential/auto", "sequential/xla_cpu", "sequential/im2col"],
    # isr_jax's compiler options are XLA's defaults off CPU, and the CPU lowerings
    # (xla_cpu, banded, dense) are CPU workarounds: compare strategies and im2col.
    "accelerator": ["auto/auto", "chunked/xla", "sequential/xla", "vmap/im2col"],
}
_SCALING_CHILD = flags.DEFINE_string("scaling_child", None, "internal: one scaling row as JSON.")


# --------------------------------------------------------------------------- workloads
def synthetic_clients(num_clients, steps, batch, shape, num_classes=10, seed=0) -> ClientData:
  """Random images/labels packed as [C, S, B, ...] (every slot real)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((num_clients, steps, batch, *shape), dtype=np.float32)
  y = rng.integers(0, num_classes, (num_clients, steps, batch)).astype(np.int32)
  mask = np.ones((num_clients, steps, batch), bool)
  return ClientData(x, y, mask, np.full(num_clients, steps * batch, np.int32))


def _fedavg_problem(model_name, shape, conv_impl, taps, model_options):
  """``(graphdef's problem, params)`` of the benchmark's model with ``taps`` ISR taps."""
  net = create_model(model_name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0),
                     conv_impl=conv_impl, **(model_options or {}))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=taps > 0, num_taps=taps, mi_weight=0.1,
                       ne_weight=0.01)
  params = init_params(graphdef, model_params, spec, num_classes=10, input_shape=shape,
                       key=jax.random.PRNGKey(1))
  return make_problem(graphdef, spec), params


def jax_setup(model_name, shape, data, *, taps=0, lr=0.01, momentum=0.9, strategy="vmap",
              chunk=0, conv_impl="auto", model_options=None, xla_defaults=False):
  """The isr_jax FedAvg round for ``data``.

  Returns ``(jitted round, state, FLOPs per round, (strategy, chunk))``, the last
  with ``auto`` resolved as ``train_and_evaluate`` resolves it
  (:func:`auto_parallelism`). The round is compiled as ``train_and_evaluate``
  compiles it (:func:`xla_compiler_options`) unless ``xla_defaults``.

  FLOPs come from XLA's cost analysis of ONE jitted local step (a loop body is
  counted once in the round's own analysis) times clients × steps.
  """
  one_batch = Batch(data.x[0, 0], data.y[0, 0], jnp.ones(data.y[0, 0].shape, bool))
  lowering = resolve_conv_impl(conv_impl, resolve_parallelism(strategy))
  problem, params = _fedavg_problem(model_name, shape, lowering, taps, model_options)
  strategy, chunk = auto_parallelism(
      strategy, chunk, clients=data.num_clients,
      step_flops=lambda: local_step_flops(problem.loss, params, one_batch))
  if resolve_conv_impl(conv_impl, strategy) != lowering:
    problem, params = _fedavg_problem(model_name, shape, resolve_conv_impl(conv_impl, strategy),
                                      taps, model_options)
  local = optax.inject_hyperparams(optax.sgd, static_args=("momentum",))(
      learning_rate=lr, momentum=momentum)
  steps = data.steps_per_epoch
  fl_spec = FLSpec(clients_per_round=data.num_clients, local_steps=steps, parallelism=strategy,
                   chunk_size=chunk)
  # FedAvg: the server applies the mean update as it is (SGD at 1, make_round's default).
  fl = make_round(fedavg(), problem, fl_spec, local_optimizer=local, local_lr=lr)
  state = fl.init(params, data, jax.random.PRNGKey(2))
  step = fl.jit(donate=True, compiler_options=None if xla_defaults else xla_compiler_options())

  def one_local_step(p, o, x, y):
    g, _ = jax.grad(problem.loss, has_aux=True)(p, Batch(x, y, jnp.ones(y.shape, bool)))
    u, o = local.update(g, o, p)
    return optax.apply_updates(p, u), o

  cost = jax.jit(one_local_step).lower(
      params, local.init(params), data.x[0, 0], data.y[0, 0]).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", float("nan"))) * data.num_clients * steps
  return step, state, flops, (strategy, chunk)


def jax_step_loop(model_name, shape, data, lr=0.01, momentum=0.9):
  """fedjax's way: a Python loop over clients and batches of one jitted step."""
  net = create_model(model_name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  graphdef, params = split_model(net)
  problem = make_problem(graphdef, None)
  opt = optax.sgd(lr, momentum=momentum)

  # The same compiler options as the round, so the two rows differ in structure only.
  @functools.partial(jax.jit, compiler_options=xla_compiler_options())
  def step(p, o, x, y):
    params = {"model": p, "adapters": {}}
    (_, _), g = jax.value_and_grad(problem.loss, has_aux=True)(
        params, Batch(x, y, jnp.ones(y.shape, bool)))
    u, o = opt.update(g["model"], o, p)
    return optax.apply_updates(p, u), o

  x = jnp.asarray(data.x)
  y = jnp.asarray(data.y)

  def one_round():
    results = []
    for c in range(data.num_clients):
      p, o = params, opt.init(params)
      for s in range(data.steps_per_epoch):
        p, o = step(p, o, x[c, s], y[c, s])
      results.append(p)
    jax.block_until_ready(jax.tree.map(lambda *a: sum(a) / len(a), *results))

  one_round()
  return one_round


# --------------------------------------------------------------------------- sections
def _row(name, seconds, samples, baseline, compile_s=None, flops=None):
  ratio = baseline / seconds if baseline else float("nan")
  gflops = flops / seconds / 1e9 if flops and np.isfinite(flops) else float("nan")
  compile_txt = f"{compile_s:.1f}" if compile_s is not None else "–"
  return (f"| {name} | {seconds:.3f} | {samples / seconds:,.0f} | {ratio:.2f}× | "
          f"{compile_txt} | {gflops:.0f} |")


HEADER = table_header("implementation", "s / round", "samples / s", "speed vs PyTorch",
                      "compile s", "achieved GFLOP/s")


def section_round(title, model_name, torch_name, shape, clients, steps, batch, repeats,
                  strategies):
  data = synthetic_clients(clients, steps, batch, shape)
  samples = clients * steps * batch
  print(f"\n### {title}\n\n{clients} clients × {steps} local steps × batch {batch}, "
        f"{shape} inputs (synthetic), SGD momentum 0.9\n\n{HEADER}", flush=True)
  device_data = jax.tree.map(jnp.asarray, data)
  # XLA's count of the textbook arithmetic (lax.conv) gives the baselines' FLOP/s;
  # each isr_jax row is divided by the count of its own program.
  _, _, work, _ = jax_setup(model_name, shape, device_data, strategy="sequential",
                            conv_impl="xla")
  rows = []  # (label, one-round callable, compile seconds, FLOPs)
  pytorch = torch_rows("round", torch_name, data.x, data.y) if torch_available() else []
  rows += [(label, run, None, work) for label, run in pytorch]
  rows.append(("JAX: Python loop of one jitted step (fedjax's way)",
               jax_step_loop(model_name, shape, data), None, work))
  for strategy, conv_impl, *options in strategies:
    chunk = max(1, clients // 5) if strategy == "chunked" else 0
    xla_defaults = options == ["xla_defaults"]
    step, state, flops, (ran, ran_chunk) = jax_setup(
        model_name, shape, device_data, strategy=strategy, chunk=chunk, conv_impl=conv_impl,
        xla_defaults=xla_defaults)
    compile_s, one_round = jax_round_runner(step, state, device_data)
    label = (f"isr_jax round, {strategy_label(strategy, ran, ran_chunk)}, conv {conv_impl}"
             + (", XLA's default options" if xla_defaults else ""))
    rows.append((label, one_round, compile_s, flops))
  seconds = interleaved_medians([run for _, run, _, _ in rows], repeats)
  for _, process in pytorch:
    process.close()
  torch_s = seconds[0] if pytorch else None
  for (label, _, compile_s, flops), s in zip(rows, seconds, strict=True):
    print(_row(label, s, samples, torch_s, compile_s, flops), flush=True)


def section_isr(repeats):
  shape, data = (28, 28, 1), synthetic_clients(10, 20, 64, (28, 28, 1))
  device_data = jax.tree.map(jnp.asarray, data)
  print("\n### ISR overhead\n\nFedAvg CNN, 10 clients × 20 steps × batch 64, strategy and conv "
        "lowering auto; taps chosen "
        "input-first (conv1, pool1, conv2, pool2, features)\n\n"
        "| ISR taps | s / round | overhead vs 0 taps | compile s |\n|---|---|---|---|")
  runners = []
  for taps in (0, 1, 3, 5):
    step, state, _, _ = jax_setup("fedavg_cnn", shape, device_data, taps=taps,
                                  strategy="auto", conv_impl="auto")
    runners.append(jax_round_runner(step, state, device_data))
  seconds = interleaved_medians([run for _, run in runners], repeats)
  for taps, (compile_s, _), s in zip((0, 1, 3, 5), runners, seconds, strict=True):
    print(f"| {taps} | {s:.3f} | {100 * (s / seconds[0] - 1):+.1f} % | {compile_s:.1f} |",
          flush=True)


SCALING_ROWS = [
    # (model, input shape, clients, steps, batch, strategy, chunk); conv lowering "auto"
    ("lenet5", (8, 8, 1), 10, 5, 16, "vmap", 0),
    ("lenet5", (8, 8, 1), 100, 5, 16, "vmap", 0),
    ("lenet5", (8, 8, 1), 1000, 5, 16, "vmap", 0),
    ("lenet5", (8, 8, 1), 1000, 5, 16, "chunked", 100),
    ("lenet5", (8, 8, 1), 1000, 5, 16, "sequential", 0),
    ("lenet5", (8, 8, 1), 1000, 5, 16, "auto", 0),
    ("resnet18", (32, 32, 3), 10, 1, 16, "sequential", 0),
    ("resnet18", (32, 32, 3), 10, 1, 16, "chunked", 5),
    ("resnet18", (32, 32, 3), 100, 1, 16, "sequential", 0),
    ("resnet18", (32, 32, 3), 100, 1, 16, "chunked", 5),
]


def scaling_child(spec_json: str):
  """One scaling row in this (fresh) process; prints JSON with time and peak memory.

  Peak memory is the process's maximum resident set (host RAM, which on CPU holds
  the "device" buffers too) and, where the device reports it (GPU/TPU), the
  device allocator's peak.
  """
  model, shape, clients, steps, batch, strategy, chunk = json.loads(spec_json)
  data = jax.tree.map(jnp.asarray, synthetic_clients(clients, steps, batch, tuple(shape)))
  step, state, _, ran = jax_setup(model, tuple(shape), data, strategy=strategy, chunk=chunk)
  compile_s, s = time_jax_round(step, state, data, 1)
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  device_stats = jax.devices()[0].memory_stats() or {}
  device_peak = device_stats.get("peak_bytes_in_use")
  print(json.dumps({"ran": ran, "compile_s": compile_s, "round_s": s, "peak_gib": peak_gib,
                    "device_peak_gib": None if device_peak is None else device_peak / 2**30}))


def section_scaling():
  print("\n### Scaling with clients per round\n\nEach row in a fresh process; host peak is "
        "the process's maximum resident set (on CPU that includes the 'device'); device "
        "peak is the accelerator allocator's, where there is one.\n\n"
        "| model | clients | steps × batch | strategy | s / round | ms / client | "
        "host peak GiB | device peak GiB | compile s |\n|---|---|---|---|---|---|---|---|---|")
  for row in SCALING_ROWS:
    model, shape, clients, steps, batch, strategy, chunk = row
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.fl_round", f"--scaling_child={json.dumps(row)}"],
        capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
      label = strategy_label(strategy, strategy, chunk)
      reason = (proc.stderr.strip().splitlines() or ["?"])[-1][:80]
      print(f"| {model} | {clients} | {steps} × {batch} | {label} | failed: {reason} ||||||",
            flush=True)
      continue
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    label = strategy_label(strategy, *r["ran"])
    device_peak = "–" if r["device_peak_gib"] is None else f"{r['device_peak_gib']:.2f}"
    print(f"| {model} | {clients} | {steps} × {batch} | {label} | {r['round_s']:.2f} | "
          f"{1000 * r['round_s'] / clients:.1f} | {r['peak_gib']:.2f} | {device_peak} | "
          f"{r['compile_s']:.1f} |", flush=True)


AUTO_RULE_ROWS = [
    # (model, input shape, batch, clients, local steps, chunk sizes tried)
    ("lenet5", (8, 8, 1), 16, 100, 20, (10, 25, 50)),
    ("lenet5", (8, 8, 1), 64, 40, 20, (4, 8, 20)),
    ("lenet5", (28, 28, 1), 16, 20, 10, (2, 4, 10)),
    ("fedavg_cnn", (8, 8, 1), 16, 20, 10, (2, 4)),
    ("lenet5", (28, 28, 1), 32, 10, 10, (2, 5)),
    ("lenet5", (28, 28, 1), 64, 10, 10, (2, 5)),
]


def section_auto_rule(repeats):
  """``sequential`` against ``chunked`` across local-step costs, and ``auto``'s pick."""
  print("\n### auto's CPU rule: sequential against chunked, by the cost of a local step\n\n"
        "Synthetic clients, fixed local steps, SGD momentum 0.9; speed relative to "
        "`sequential` (median of the per-repeat ratios). Step MFLOP: what `auto` counts "
        "(XLA's count of the loss's forward pass × 3).\n\n"
        "| model | input | batch | clients × steps | step MFLOP | sequential s / round | "
        "chunked: speed vs sequential | auto runs |\n|---|---|---|---|---|---|---|---|",
        flush=True)
  for model, shape, batch, clients, steps, chunks in AUTO_RULE_ROWS:
    data = jax.tree.map(jnp.asarray, synthetic_clients(clients, steps, batch, shape))
    runners = []
    for strategy, chunk in [("sequential", 0)] + [("chunked", c) for c in chunks]:
      step, state, _, _ = jax_setup(model, shape, data, strategy=strategy, chunk=chunk)
      runners.append(jax_round_runner(step, state, data)[1])
    problem, params = _fedavg_problem(model, shape, "auto", 0, None)
    one_batch = Batch(data.x[0, 0], data.y[0, 0], jnp.ones(data.y[0, 0].shape, bool))
    counted = local_step_flops(problem.loss, params, one_batch)
    ran, ran_chunk = auto_parallelism("auto", 0, clients=clients,
                                      step_flops=lambda counted=counted: counted)
    times = interleaved_times(runners, repeats)
    seq = times[0]
    ratios = ", ".join(f"{c}: {np.median(seq / t):.2f}×"
                       for c, t in zip(chunks, times[1:], strict=True))
    picked = strategy_label(ran, ran, ran_chunk)
    print(f"| {model} | {shape[0]}×{shape[1]} | {batch} | {clients} × {steps} | "
          f"{counted / 1e6:.1f} | {np.median(seq):.3f} | {ratios} | {picked} |", flush=True)


def main(argv):
  del argv
  if _SCALING_CHILD.value:
    scaling_child(_SCALING_CHILD.value)
    return
  torch_version = torch_description()
  print(f"# isr_jax FL round benchmark\n\n{machine_description(torch_version)}")
  on_cpu = jax.default_backend() == "cpu"
  sections = set(_SECTIONS.value or DEFAULT_SECTIONS + ([] if on_cpu else ["many_clients"]))
  if unknown := sections - set(SECTIONS):
    raise app.UsageError(f"--sections {sorted(unknown)} not among {SECTIONS}")
  repeats = _REPEATS.value
  default_strategies = DEFAULT_STRATEGIES["cpu" if on_cpu else "accelerator"]
  strategies = [tuple(s.split("/")) for s in _STRATEGIES.value or default_strategies]
  for s in strategies:
    if len(s) not in (2, 3) or s[2:] not in ((), ("xla_defaults",)):
      raise app.UsageError(f"--strategies entry {'/'.join(s)!r} is not "
                           "client_parallelism/conv_impl[/xla_defaults]")
  if "compute" in sections:
    section_round("Compute-bound: FedAvg CNN", "fedavg_cnn", "fedavg_cnn", (28, 28, 1),
                  10, 50, 64, repeats, strategies)
  if "overhead" in sections:
    section_round("Overhead-bound: small CNN on 8×8", "lenet5", "small_cnn", (8, 8, 1),
                  100, 20, 16, repeats, strategies)
  if "many_clients" in sections:
    section_round(f"Many clients: FedAvg CNN, {_MANY_CLIENTS.value} clients", "fedavg_cnn",
                  "fedavg_cnn", (28, 28, 1), _MANY_CLIENTS.value, 50, 64, repeats, strategies)
  if "isr" in sections:
    section_isr(repeats)
  if "scaling" in sections:
    section_scaling()
  if "auto_rule" in sections:
    section_auto_rule(repeats)


if __name__ == "__main__":
  app.run(main)
