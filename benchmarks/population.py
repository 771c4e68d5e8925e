r"""Rounds over a population held off the device: time and memory against population size.

  python -m benchmarks.population                                # every section
  python -m benchmarks.population --sections=scale --populations=100,1000 --sampled=10
  python -m benchmarks.population --sections=resnet --resnet_clients=1000

Sections (``--sections``):

* ``scale`` — FedAvg and FedPer rounds of LeNet-5 on **synthetic** 28×28×1
  inputs (random: only time and memory are measured) whose client sizes follow
  a power law: ``⌈5·(1 + Pareto(1.2))⌉`` examples, capped at 256, client 0
  holding the cap, so every population has the same largest client (the same
  padded steps) and its sampled clients the same size distribution: the same
  sampled work. Populations ``--populations`` (FedAvg also ``--big``),
  ``--sampled`` clients per round, one local epoch of batches of 32, the data in
  a :class:`~isr_jax.data.ragged.RaggedClients` store and the client state in a
  :class:`~isr_jax.fl.state_store.HostStateStore`
  (:class:`~isr_jax.fl.population.PopulationRound`). Per row: the median round
  (host sampling, gathers and scatters included), the process's peak resident
  memory, the examples' bytes, the stored client state, what the dense layout
  would hold (every client packed to the largest, the state stacked), and for
  FedPer the streamed personalized evaluation's time per client (chunks of 256,
  each client's own examples as its test split: timing only).
* ``fmnist`` — the same on Fashion-MNIST's 60,000 training images split by the
  same power law over 1,000 and ``--fmnist_clients`` clients (needs the
  ``dataset-fashion-mnist`` package; skipped without it).
* ``resnet`` — ``--resnet_clients`` clients that each keep a whole personal
  ResNet-18 (``personal="all"``, Local's and Ditto's case) in a
  :class:`~isr_jax.fl.state_store.FileStateStore`: a round of 10 sampled clients
  (one step of 4 synthetic 32×32×3 examples each), its time, peak memory and the
  store's bytes on disk, against the dense state's size.

Memory: every population runs in a fresh process (its peak memory is its
own). Time: the populations of one (data, algorithm, clients per round) are
built in one process — synthetic clients of :data:`EQUAL` examples each, so
that any sample of clients is the same work and only the population differs —
each round compiled, then their rounds timed round-robin
(:func:`benchmarks.harness.interleaved_times`), so the machine's drift (±15–25 %
over minutes) hits them alike; read the ratio column, each population's round
over the smallest's. The sampling column times the round's ids alone: a
permutation of the population, which the dense round computes inside its jit.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.harness import (
  interleaved_times,
  machine_description,
  table_header,
  table_row,
)
from isr_jax.data import FASHION_MNIST_DIR
from isr_jax.data.ragged import RaggedClients, gather_rows, ragged_clients
from isr_jax.fl.algorithm import tree_bytes
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedper import fedper
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.file_store import FileStateStore
from isr_jax.fl.population import PopulationRound, evaluate_population, initial_rows
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.fl.state_store import HostStateStore
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer

SECTIONS = ("scale", "fmnist", "resnet")
CAP, BATCH, EVAL_CHUNK = 256, 32, 256
EQUAL = 32  # examples of every client in the timing section: the same work in any sample

_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Among {list(SECTIONS)}.",
                              allow_override=True)
_POPULATIONS = flags.DEFINE_list("populations", ["100", "1000", "10000"], "scale: populations.")
_BIG = flags.DEFINE_list("big", ["100000"], "scale: further populations, FedAvg only.")
_SAMPLED = flags.DEFINE_list("sampled", ["10", "100"], "Clients per round.")
_FMNIST = flags.DEFINE_integer("fmnist_clients", 10000, "fmnist: the larger population.")
_RESNET = flags.DEFINE_integer("resnet_clients", 1000, "resnet: clients with a personal model.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per row (median).")
_MEMORY = flags.DEFINE_bool("memory", True, "Measure each population's memory (a process each); "
                             "--nomemory times the rounds only.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run this row (JSON) and print its JSON.")


def power_law_sizes(num_clients: int, seed: int = 0) -> np.ndarray:
  """``⌈5·(1 + Pareto(1.2))⌉`` examples, capped at :data:`CAP`; client 0 holds the cap."""
  sizes = np.minimum(np.ceil(5 * (1 + np.random.default_rng(seed).pareto(1.2, num_clients))), CAP)
  sizes[0] = CAP
  return sizes.astype(np.int64)


def synthetic_population(num_clients: int, equal: bool = False) -> RaggedClients:
  """Random 28×28×1 examples in the power-law sizes (``equal``: :data:`EQUAL` each),
  written chunk by chunk."""
  sizes = np.full(num_clients, EQUAL) if equal else power_law_sizes(num_clients)
  n = int(sizes.sum())
  x = np.empty((n, 28, 28, 1), np.float32)
  rng = np.random.default_rng(1)
  for s in range(0, n, 1 << 16):
    x[s:s + (1 << 16)] = rng.random((min(1 << 16, n - s), 28, 28, 1), np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  # Written client after client already: the store is these arrays and the offsets.
  offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
  return RaggedClients(x, y, offsets, BATCH, max(-(-int(sizes.max()) // BATCH), 1))


def fmnist_population(num_clients: int) -> RaggedClients:
  """Fashion-MNIST's training images over ``num_clients`` clients in power-law sizes."""
  from isr_jax.data import load_dataset
  train, _, _ = load_dataset("fashion_mnist", seed=0)
  sizes = power_law_sizes(num_clients).astype(np.float64)
  sizes = np.maximum(np.floor(sizes / sizes.sum() * len(train.y)), 1).astype(np.int64)
  order = np.random.default_rng(0).permutation(len(train.y))[:sizes.sum()]
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  parts = [order[bounds[i]:bounds[i + 1]] for i in range(num_clients)]
  return ragged_clients(train.x, train.y, parts, BATCH)


def sgd(lr: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(name="sgd", learning_rate=lr, momentum=0.9))


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_gib() -> float | None:
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use", 0) / 2**30


# --------------------------------------------------------------------------- rows
def build_round(row: dict, clients: int):
  """``(population round, its first state, data, store, evaluate)`` of one population."""
  data = (synthetic_population(clients, row.get("equal", False)) if row["data"] == "synthetic"
          else fmnist_population(clients))
  shape = data.x.shape[1:]
  net = create_model("lenet5", num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, None, num_classes=10, input_shape=shape,
                       key=jax.random.PRNGKey(1))
  problem = make_problem(graphdef, None)
  algorithm = {"fedavg": fedavg, "fedper": fedper}[row["algorithm"]]()
  spec = FLSpec(clients_per_round=row["sampled"], local_epochs=1, num_clients=clients,
                parallelism="vmap")
  federated = make_round(algorithm, problem, spec, local_optimizer=make_optimizer(sgd(0.05)),
                         local_lr=functools.partial(learning_rate_at, sgd(0.05)))
  state = federated.init(params, gather_rows(data, np.arange(1)), jax.random.PRNGKey(2))
  store = HostStateStore(initial_rows(federated, params, data)(np.arange(clients)), clients)
  population = PopulationRound(federated.jit(donate=True), spec, data, store)
  evaluate = jax.jit(functools.partial(evaluate_clients, fns=federated.fns, spec=spec))
  return population, state._replace(client_states={}), data, store, evaluate


class RoundRunner:
  """Runs one round to completion per call (the first compiles); ``state`` is the latest."""

  def __init__(self, population: PopulationRound, state):
    self.population, self.state = population, state

  def __call__(self) -> None:
    self.state, metrics = self.population(self.state)
    jax.block_until_ready(metrics)


def run_scale_row(row: dict) -> dict:
  """One population in this process: its memory, and (FedPer) the evaluation's time."""
  t0 = time.perf_counter()
  population, state, data, store, evaluate = build_round(row, row["clients"])
  build_s = time.perf_counter() - t0
  run = RoundRunner(population, state)
  for _ in range(1 + row["repeats"]):
    run()
  out = {**row, "build_s": build_s, "examples_gib": data.nbytes / 2**30,
         "state_gib": store.nbytes_dense / 2**30,
         "dense_gib": (data.dense_nbytes + store.nbytes_dense) / 2**30}
  if row["algorithm"] == "fedper":
    kwargs = dict(chunk=EVAL_CHUNK, num_clients=row["clients"])
    evaluate_population(evaluate, run.state, data, data, store, **kwargs)  # compiles
    t0 = time.perf_counter()
    evaluate_population(evaluate, run.state, data, data, store, **kwargs)
    out["eval_ms_per_client"] = 1e3 * (time.perf_counter() - t0) / row["clients"]
  out["peak_rss_gib"], out["device_peak_gib"] = peak_rss_gib(), device_peak_gib()
  return out


def run_timing_group(group: dict) -> dict:
  """Every population of ``group`` built in this process, compiled, then their rounds
  timed round-robin: the same drift for all, so the ratios between them hold."""
  runners, sampling = [], []
  for clients in group["populations"]:
    population, state, *_ = build_round({**group, "equal": group["data"] == "synthetic"},
                                        clients)
    runners.append(RoundRunner(population, state))
    runners[-1]()  # compiles
    rng = np.asarray(jax.device_get(state.rng))
    t0 = time.perf_counter()
    for r in range(20):
      population.sample(rng, r)
    sampling.append((time.perf_counter() - t0) / 20)
  times = interleaved_times(runners, group["repeats"])
  return {**group, "round_s": [float(np.median(t)) for t in times], "sample_s": sampling}


def run_resnet_row(row: dict) -> dict:
  """``clients`` personal ResNet-18s in a file store; one compiled and ``repeats`` timed rounds."""
  shape, per_client = (32, 32, 3), 4
  rng = np.random.default_rng(0)
  n = row["clients"] * per_client
  x = rng.standard_normal((n, *shape), np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  data = ragged_clients(x, y, np.arange(n).reshape(row["clients"], per_client), per_client)
  net = create_model("resnet18", num_classes=10, input_shape=shape, rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, None, num_classes=10, input_shape=shape,
                       key=jax.random.PRNGKey(1))
  spec = FLSpec(clients_per_round=row["sampled"], local_steps=1, num_clients=row["clients"],
                parallelism="sequential")
  federated = make_round(fedavg()._replace(personal="all"), make_problem(graphdef, None), spec,
                         local_optimizer=make_optimizer(sgd(0.01)),
                         local_lr=functools.partial(learning_rate_at, sgd(0.01)))
  state = federated.init(params, gather_rows(data, np.arange(1)),
                         jax.random.PRNGKey(2))._replace(client_states={})
  init = initial_rows(federated, params, data)
  template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                          init(np.arange(1)))
  directory = tempfile.mkdtemp(prefix="population-resnet-", dir=row.get("scratch") or None)
  try:
    store = FileStateStore(directory, init, template, row["clients"])
    population = PopulationRound(federated.jit(donate=True), spec, data, store)
    t0 = time.perf_counter()
    state, metrics = population(state)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(row["repeats"]):
      t0 = time.perf_counter()
      state, metrics = population(state)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - t0)
      store.commit(r + 2, [r + 2])  # a checkpoint every round: old versions reclaimed
    disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory)
               for f in fs)
    store.close()
  finally:
    shutil.rmtree(directory, ignore_errors=True)
  return {**row, "round_s": float(np.median(times)), "compile_s": compile_s,
          "state_gib": tree_bytes(template) * row["clients"] / 2**30, "disk_gib": disk / 2**30,
          "peak_rss_gib": peak_rss_gib(), "device_peak_gib": device_peak_gib()}


def run_child(job: dict) -> dict:
  if job["section"] == "resnet":
    return run_resnet_row(job)
  return run_timing_group(job) if "populations" in job else run_scale_row(job)


def measure(job: dict) -> dict | None:
  """``job`` run in a fresh process; ``None`` (and its error shown) when it failed."""
  done = subprocess.run([sys.executable, "-m", "benchmarks.population",
                         f"--child={json.dumps(job)}"], capture_output=True, text=True)
  if done.returncode != 0:
    print(f"{job} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
    return None
  return json.loads(done.stdout.strip().splitlines()[-1])


def planned_jobs() -> tuple[list[dict], list[dict]]:
  """``(rows, timing groups)``: a process per population (memory) and a process per
  (data, algorithm, clients per round) timing all its populations together."""
  sections, repeats = set(_SECTIONS.value), _REPEATS.value
  unknown = sections - set(SECTIONS)
  if unknown:
    raise app.UsageError(f"--sections: {sorted(unknown)} not among {list(SECTIONS)}")
  groups = []
  if "scale" in sections:
    for sampled in map(int, _SAMPLED.value):
      for algorithm in ("fedavg", "fedper"):
        extra = _BIG.value if algorithm == "fedavg" else []
        populations = [c for c in map(int, [*_POPULATIONS.value, *extra]) if c >= sampled]
        groups.append(dict(section="scale", data="synthetic", algorithm=algorithm,
                           sampled=sampled, populations=populations, repeats=repeats))
  if "fmnist" in sections:
    if os.path.isdir(FASHION_MNIST_DIR):
      groups.append(dict(section="fmnist", data="fashion_mnist", algorithm="fedper",
                         sampled=10, populations=[1000, _FMNIST.value], repeats=repeats))
    else:
      print("fmnist: Fashion-MNIST not installed (apt-get install dataset-fashion-mnist); "
            "skipped", file=sys.stderr)
  rows = [{**{k: v for k, v in g.items() if k != "populations"}, "clients": c}
          for g in groups for c in g["populations"]]
  if "resnet" in sections:
    rows.append(dict(section="resnet", algorithm="local (personal ResNet-18)",
                     clients=_RESNET.value, sampled=10, repeats=max(2, repeats // 2)))
  return rows, groups


def gib(v) -> str:
  """GiB with three significant digits (client state runs from kilobytes to gigabytes)."""
  return "–" if v is None else f"{v:.3g}"


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(run_child(json.loads(_CHILD.value))))
    return
  rows, groups = planned_jobs()
  timed = {}
  for group in groups:
    done = measure(group)
    for clients, seconds in zip(group["populations"], done["round_s"] if done else [],
                                strict=False):
      key = (group["section"], group["algorithm"], group["sampled"])
      i = group["populations"].index(clients)
      timed[key + (clients,)] = (seconds, seconds / done["round_s"][0], done["sample_s"][i])
  if not _MEMORY.value:  # the timed populations, without their memory columns
    rows = [r for r in rows if r["section"] == "resnet"]
  results = [r for r in map(measure, rows) if r is not None]
  if not _MEMORY.value:
    results = [dict(section=k[0], algorithm=k[1], sampled=k[2], clients=k[3],
                    data="synthetic" if k[0] == "scale" else "fashion_mnist")
               for k in timed] + results
  print(machine_description())
  print("Memory: each population (power-law sizes) in a fresh process, peak resident memory "
        f"after one compiled and {_REPEATS.value} rounds. Time: each (data, algorithm, clients "
        f"per round) in one process, synthetic clients of {EQUAL} examples each (the same "
        "work whichever are sampled), rounds timed round-robin, median of "
        f"{_REPEATS.value}; × smallest = ratio to the smallest population; sampling = the "
        "round's ids alone (the dense round draws the same inside its jit)\n")
  scale = [r for r in results if r["section"] in ("scale", "fmnist")]
  if scale:
    print(table_header("data", "algorithm", "clients", "per round", "round (ms)",
                       "× smallest", "sampling (ms)", "peak RSS (GiB)", "examples (GiB)",
                       "client state (GiB)", "dense layout (GiB)", "eval (ms / client)",
                       "device peak (GiB)"))
    for r in scale:
      seconds, ratio, sample = timed.get(
          (r["section"], r["algorithm"], r["sampled"], r["clients"]), (None, None, None))
      print(table_row(r["data"], r["algorithm"], r["clients"], r["sampled"],
                      "–" if seconds is None else f"{1e3 * seconds:.1f}",
                      "–" if ratio is None else f"{ratio:.2f}",
                      "–" if sample is None else f"{1e3 * sample:.2f}", gib(r.get("peak_rss_gib")),
                      gib(r.get("examples_gib")), gib(r.get("state_gib")),
                      gib(r.get("dense_gib")),
                      "–" if "eval_ms_per_client" not in r else f"{r['eval_ms_per_client']:.3f}",
                      gib(r.get("device_peak_gib"))))
  for r in (r for r in results if r["section"] == "resnet"):
    print()
    print(table_header("clients", "per round", "round (s)", "peak RSS (GiB)",
                       "personal state, dense (GiB)", "file store on disk (GiB)",
                       "device peak (GiB)"))
    print(table_row(r["clients"], r["sampled"], f"{r['round_s']:.2f}", gib(r["peak_rss_gib"]),
                    gib(r["state_gib"]), gib(r["disk_gib"]), gib(r["device_peak_gib"])))


if __name__ == "__main__":
  app.run(main)
