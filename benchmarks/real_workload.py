r"""What FL researchers run: Fashion-MNIST, LeNet-5, FedAvg, isr_jax against PyTorch.

  python -m benchmarks.real_workload                              # every section
  python -m benchmarks.real_workload --sections=device_e1 --repeats=3
  python -m benchmarks.real_workload --strategies=auto,chunked/5

Real Fashion-MNIST (Debian package ``dataset-fashion-mnist``, inputs in [0, 1])
and the cross-silo preset (``experiments/configs/cross_silo.py``): LeNet-5
(61,706 parameters), batch 64, whole local epochs, SGD lr 0.01 momentum 0.9
weight decay 1e-5, FedAvg weighted by |D_n|. Sections:

* ``silo_dirichlet``, ``silo_classes2`` — 10 clients, all sampled, 10 local
  epochs; label skew Dirichlet(0.5) or "#C = 2" (NIID-Bench's cross-silo setting).
* ``device_e1``, ``device_e5`` — 100 clients, 10 sampled per round, 1 or 5 local
  epochs, Dirichlet(0.5).

Both sides train the same clients on the same examples: the partition is
``isr_jax.data.partition`` with seed 0, each isr_jax row is built by
:func:`isr_jax.experiment.build_experiment` from the preset (what a user runs), and
the PyTorch loop gets the very index sets and, each round, the clients the JAX
round samples (rows advance their rounds together under interleaved timing).
The padding column is the share of the local steps a row executes that are
padding: a client runs ``E·ceil(n/B)`` real steps, and clients that run side by
side (a vmapped chunk) each run as many as the largest of them (the local
loop's trip count is the chunk's longest client, not the partition's).

A full run (every section, the default strategies, ``--repeats=2``) takes about
an hour on a quiet 2-core CPU, mostly the two cross-silo sections' ``vmap`` and
``chunked`` rows; ``--strategies=auto,chunked/2`` roughly halves it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.harness import (
  interleaved_medians,
  jax_round_runner,
  machine_description,
  strategy_label,
  table_header,
)
from benchmarks.torch_baseline import torch_available, torch_description, torch_rows
from experiments.configs import cross_silo
from isr_jax.data import ClientData, load_dataset, partition
from isr_jax.errors import DataNotFoundError
from isr_jax.experiment import build_experiment
from isr_jax.fl.client import resolve_parallelism
from isr_jax.fl.selection import round_keys, sample_clients, size_balanced_order
from isr_jax.fl.spec import FLSpec
from isr_jax.sharding import make_mesh, padded_count


class Workload(NamedTuple):
  """One section: a label skew of the preset, clients and local epochs."""

  title: str
  skew: str  # an argument of experiments/configs/cross_silo.py
  num_clients: int
  clients_per_round: int
  local_epochs: int


WORKLOADS = {
    "silo_dirichlet": Workload("Cross-silo, Dirichlet(0.5)", "dirichlet", 10, 10, 10),
    "silo_classes2": Workload("Cross-silo, #C = 2", "classes2", 10, 10, 10),
    "device_e1": Workload("Cross-device, Dirichlet(0.5), 1 epoch", "dirichlet", 100, 10, 1),
    "device_e5": Workload("Cross-device, Dirichlet(0.5), 5 epochs", "dirichlet", 100, 10, 5),
}
DEFAULT_STRATEGIES = ["auto", "sequential", "chunked/2", "chunked/5", "vmap"]

# allow_override: other benchmarks define --sections/--repeats/--strategies too (their
# sections, their strategy syntax), and a test process may import several of them.
_SECTIONS = flags.DEFINE_list("sections", list(WORKLOADS), f"Sections among {list(WORKLOADS)}.",
                              allow_override=True)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rounds per row.", allow_override=True)
_ROUNDS_WARMUP = flags.DEFINE_integer(
    "rounds_warmup", 1, "Untimed rounds per row before timing (>= 1; the first one is the "
    "JAX round's first call after compiling).")
_STRATEGIES = flags.DEFINE_list(
    "strategies", DEFAULT_STRATEGIES,
    "isr_jax rows: fl.client_parallelism, 'chunked/<chunk size>' for chunked.",
    allow_override=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Fashion-MNIST IDX directory (default: the Debian package's).")


# --------------------------------------------------------------------------- workload
def workload_config(w: Workload, parallelism: str = "auto", chunk_size: int = 0,
                    data_dir: str | None = None):
  """The cross-silo preset with ``w``'s partition, clients, epochs and a strategy."""
  c = cross_silo.get_config(w.skew)
  c.dataset.data_dir = data_dir
  c.fl.num_clients = w.num_clients
  c.fl.clients_per_round = w.clients_per_round
  c.fl.local_epochs = w.local_epochs
  c.fl.local_steps = 0  # whole epochs
  c.fl.client_parallelism = parallelism
  c.fl.chunk_size = chunk_size
  return c


def client_index_sets(config):
  """``(train split, one index array per client)``, as ``build_experiment`` partitions.

  The same ``load_dataset`` and ``partition`` calls with the same settings as
  :func:`isr_jax.experiment.build_experiment` (whose packed rows
  :func:`check_same_clients` compares against these sets).
  """
  ds, part = config.dataset, config.fl.partition
  train, _, _ = load_dataset(ds.name, data_dir=ds.data_dir, seed=config.seed,
                             test_fraction=ds.test_fraction, standardize=ds.standardize)
  clients = partition(train.y, config.fl.num_clients, part.method, seed=config.seed,
                      concentration=part.dirichlet_alpha,
                      shards_per_client=part.shards_per_client,
                      classes_per_client=part.classes_per_client)
  return train, clients


def check_same_clients(data: ClientData, train, clients) -> None:
  """Raises unless client ``c``'s packed row holds exactly ``train[clients[c]]``, in order."""
  x, y, sizes = np.asarray(data.x), np.asarray(data.y), np.asarray(data.num_examples)
  for c, idx in enumerate(clients):
    n = len(idx)
    rows = lambda a, c=c, n=n: a[c].reshape((-1,) + a.shape[3:])[:n]
    if (sizes[c] != n or not np.array_equal(rows(y), train.y[idx])
        or not np.array_equal(rows(x), train.x[idx])):
      raise AssertionError(f"client {c}: the JAX round's data is not train[clients[{c}]]")


def sampled_ids(state, num_clients: int, k: int, rounds: int) -> list[np.ndarray]:
  """The clients the FL round samples in rounds ``state.round, …, + rounds − 1``.

  The same derivation as :func:`isr_jax.fl.round.federated_update`.
  """
  start = int(state.round)
  return [np.asarray(sample_clients(
      round_keys(state._replace(round=jnp.asarray(r, jnp.int32)))[0], num_clients, k))
          for r in range(start, start + rounds)]


# --------------------------------------------------------------------------- step counts
def client_steps(sizes, batch_size: int, epochs: int) -> np.ndarray:
  """``E·ceil(n/B)`` per client: the steps that see at least one real example."""
  sizes = np.asarray(sizes, np.int64)
  return epochs * (-(-sizes // batch_size))


def real_steps(sizes, batch_size: int, epochs: int) -> int:
  """Σ_n E·ceil(n_n/B) over the sampled clients (what the PyTorch loop runs)."""
  return int(client_steps(sizes, batch_size, epochs).sum())


def executed_steps(sizes, *, batch_size: int, epochs: int, parallelism: str,
                   chunk_size: int = 0, mesh=None) -> int:
  """Client-steps the FL round executes for the sampled clients of ``sizes``.

  Clients enter the client map in :func:`size_balanced_order`, split over the
  mesh's devices in equal contiguous shares (padded with empty clients). On a
  device, ``sequential`` runs each client for its own steps (all-padding steps
  are skipped), ``chunked`` runs ``lax.map`` over chunks of ``chunk_size``
  vmapped clients (the remainder last) and ``vmap`` is one chunk of them all;
  every client of a vmapped chunk executes as many steps as its largest one.
  """
  parallelism = resolve_parallelism(parallelism)
  sizes = np.asarray(sizes, np.int64)
  padded = padded_count(len(sizes), mesh)
  sizes = np.concatenate([sizes, np.zeros(padded - len(sizes), np.int64)])
  spec = FLSpec(clients_per_round=padded, parallelism=parallelism, chunk_size=chunk_size,
                mesh=mesh)
  order = np.asarray(size_balanced_order(jnp.asarray(sizes), spec))
  steps = client_steps(sizes[order], batch_size, epochs)
  devices = 1 if mesh is None else mesh.size
  per_device = padded // devices
  chunk = {"sequential": 1, "vmap": per_device, "chunked": max(int(chunk_size), 1)}[parallelism]
  total = 0
  for share in steps.reshape(devices, per_device):
    for i in range(0, per_device, chunk):
      lanes = share[i:i + chunk]
      total += len(lanes) * int(lanes.max())
  return total


# --------------------------------------------------------------------------- section
def parse_strategy(entry: str) -> tuple[str, int]:
  """``"chunked/5"`` -> ``("chunked", 5)``; ``"vmap"`` -> ``("vmap", 0)``."""
  name, _, chunk = entry.partition("/")
  if name == "chunked":
    if not chunk.isdigit() or int(chunk) < 1:
      raise app.UsageError(f"--strategies entry {entry!r}: write chunked/<chunk size>")
    return name, int(chunk)
  if chunk or name not in ("auto", "vmap", "sequential"):
    raise app.UsageError(f"--strategies entry {entry!r} is not auto, sequential, vmap or "
                         "chunked/<chunk size>")
  return name, 0


HEADER = table_header("implementation", "s / round", "samples / s", "speed vs PyTorch",
                      "compile s", "executed steps / round", "padding steps")


def _row(name, seconds, samples, baseline, compile_s, executed, real):
  ratio = baseline / seconds if baseline else float("nan")
  compile_txt = f"{compile_s:.1f}" if compile_s is not None else "–"
  return (f"| {name} | {seconds:.3f} | {samples / seconds:,.0f} | {ratio:.2f}× | {compile_txt} "
          f"| {executed:,.0f} | {100 * (1 - real / executed):.1f} % |")


def build_rows(w: Workload, strategies, *, rounds: int, data_dir=None):
  """Everything a section times, built and checked, nothing timed yet.

  Returns:
    ``(data, train, clients, ids, rows)``: the packed client data of the JAX
    rows, the train split and client index sets, the sampled clients of each
    of ``rounds`` rounds, and per isr_jax strategy ``(label, parallelism,
    chunk, jitted round, initial state)``.
  """
  train, clients = client_index_sets(workload_config(w, data_dir=data_dir))
  data, ids, rows = None, None, []
  for parallelism, chunk in strategies:
    exp = build_experiment(workload_config(w, parallelism, chunk, data_dir))
    if data is None:
      data = exp.round_data[0]
      check_same_clients(data, train, clients)
      ids = sampled_ids(exp.state, w.num_clients, w.clients_per_round, rounds)
    elif not np.array_equal(np.asarray(exp.state.rng), np.asarray(rows[0][4].rng)):
      raise AssertionError("rows would sample different clients")
    ran, ran_chunk = exp.fl_spec.parallelism, exp.fl_spec.chunk_size
    label = f"isr_jax round, {strategy_label(parallelism, ran, ran_chunk)}"
    rows.append((label, ran, ran_chunk, exp.round_fn, exp.state))
  return data, train, clients, ids, rows


def section(name: str, strategies, repeats: int, rounds_warmup: int, data_dir=None):
  w = WORKLOADS[name]
  try:
    data, train, clients, ids, jax_rows = build_rows(
        w, strategies, rounds=rounds_warmup + repeats, data_dir=data_dir)
  except DataNotFoundError as err:
    print(f"\n### {w.title}\n\nskipped: {err}", flush=True)
    return
  sizes = np.array([len(c) for c in clients])
  batch, epochs = data.batch_size, w.local_epochs
  timed = ids[rounds_warmup:]
  real = sum(real_steps(sizes[r], batch, epochs) for r in timed) / repeats
  samples = sum(epochs * int(sizes[r].sum()) for r in timed) / repeats
  print(f"\n### {w.title}\n\nFashion-MNIST, LeNet-5, FedAvg, {w.num_clients} clients "
        f"({w.clients_per_round} per round) × {epochs} local epochs × batch {batch}, "
        f"SGD lr 0.01 momentum 0.9 wd 1e-5; client sizes min {sizes.min()} / mean "
        f"{sizes.mean():.0f} / max {sizes.max()}; {real:,.0f} real local steps per round "
        f"(mean of the {repeats} timed rounds)\n\n{HEADER}", flush=True)
  mesh = make_mesh(None)
  rows = []  # (label, one-round callable, compile seconds, executed steps per round)
  pytorch = (torch_rows("fedavg", train.x, train.y, clients, ids, epochs=epochs, batch_size=batch)
             if torch_available() else [])
  rows += [(label, run, None, real) for label, run in pytorch]
  for label, parallelism, chunk, step, state in jax_rows:
    compile_s, one_round = jax_round_runner(step, state, data)
    executed = sum(executed_steps(sizes[r], batch_size=batch, epochs=epochs,
                                  parallelism=parallelism, chunk_size=chunk, mesh=mesh)
                   for r in timed) / repeats
    rows.append((label, one_round, compile_s, executed))
  del jax_rows
  for _, run, _, _ in rows:  # PyTorch's processes and jax_round_runner ran the first
    for _ in range(rounds_warmup - 1):
      run()
  seconds = interleaved_medians([run for _, run, _, _ in rows], repeats)
  for _, process in pytorch:
    process.close()
  torch_s = seconds[0] if pytorch else None
  for (label, _, compile_s, executed), s in zip(rows, seconds, strict=True):
    print(_row(label, s, samples, torch_s, compile_s, executed, real), flush=True)


def main(argv):
  del argv
  torch_version = torch_description()
  if unknown := set(_SECTIONS.value) - set(WORKLOADS):
    raise app.UsageError(f"--sections {sorted(unknown)} not among {list(WORKLOADS)}")
  if _ROUNDS_WARMUP.value < 1 or _REPEATS.value < 1:
    raise app.UsageError("--rounds_warmup and --repeats must be >= 1")
  strategies = [parse_strategy(s) for s in _STRATEGIES.value]
  print(f"# isr_jax real-workload benchmark\n\n{machine_description(torch_version)}")
  for name in _SECTIONS.value:
    section(name, strategies, _REPEATS.value, _ROUNDS_WARMUP.value, _DATA_DIR.value)


if __name__ == "__main__":
  app.run(main)
