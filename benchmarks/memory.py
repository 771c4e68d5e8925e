r"""Memory of federated rounds: clients' personal state, and a round's scratch.

  python -m benchmarks.memory                       # both sections
  python -m benchmarks.memory --sections=personal   # ResNet-18, 10 and 100 clients
  python -m benchmarks.memory --sections=round --strategies=sequential   # ResNet-18, 5–40
  python -m benchmarks.memory --sections=round --model=lenet5 --clients=10,100

Sections (``--sections``):

* ``personal`` — peak memory of a run whose clients each keep a whole personal
  model (``personal="all"``, the worst case of the personalized methods:
  Local's; Ditto's ``v_i`` is the same size). Each row runs in a fresh process:
  it builds the run's state, compiles and runs one round (2 sampled clients,
  ``sequential``) and one personalized evaluation over every client, and
  reports the personal state's bytes (from shapes) and the process's peak
  resident memory. Default clients: 10 and 100.
* ``round`` — a round's memory against clients per round. For each number of
  sampled clients and each ``--strategies`` entry (``chunked``: chunks of 5),
  one round is compiled twice: with the algorithm's messages summed client by
  client as they finish (``mean_messages``, what FedAvg's rule and the
  algorithms built on it use) and stacked for the server
  (``mean_messages=False``). The figure is XLA's own count of the compiled
  program's scratch (``memory_analysis().temp_size_in_bytes``: every
  intermediate buffer, not the inputs), so it does not depend on the allocator
  or on what else the machine runs; nothing is executed. Default clients: 5,
  10, 20, 40.

Both build FedAvg rounds through :func:`isr_jax.fl.round.make_round` (local SGD
lr 0.01 momentum 0.9, one local step; server SGD at 1) on synthetic random
32×32×3 inputs, one batch of 4 per client: only memory is measured, no dataset
is read.
"""

from __future__ import annotations

import functools
import json
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.harness import machine_description, table_header, table_row
from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.round import FederatedRound, make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer

SECTIONS = ("personal", "round")
DEFAULT_CLIENTS = {"personal": [10, 100], "round": [5, 10, 20, 40]}
SHAPE, NUM_CLASSES, BATCH = (32, 32, 3), 10, 4

# allow_override: other benchmarks define flags of these names too, and a test process
# may import several of them.
_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Sections among {list(SECTIONS)}.",
                              allow_override=True)
_CLIENTS = flags.DEFINE_list(
    "clients", None, "Client counts (default: personal "
    f"{DEFAULT_CLIENTS['personal']}, round {DEFAULT_CLIENTS['round']}).", allow_override=True)
_MODEL = flags.DEFINE_string("model", "resnet18", "Model.", allow_override=True)
_STRATEGIES = flags.DEFINE_list("strategies", ["sequential", "chunked"],
                                "round section: client parallelism (chunked: chunks of 5).",
                                allow_override=True)
_PERSONAL_CHILD = flags.DEFINE_integer(
    "personal_child", 0, "Internal: measure the personal section's row of this many clients "
    "in this process, print it as JSON.")


# --------------------------------------------------------------------------- rounds
def synthetic_problem(num_clients: int, model_name: str):
  """``(problem, params, data)``: ``model_name``'s loss, its parameters, one batch a client."""
  net = create_model(model_name, num_classes=NUM_CLASSES, input_shape=SHAPE, rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, None, num_classes=NUM_CLASSES,
                       input_shape=SHAPE, key=jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  data = ClientData(
      x=jnp.asarray(rng.standard_normal((num_clients, 1, BATCH, *SHAPE), np.float32)),
      y=jnp.asarray(rng.integers(0, NUM_CLASSES, (num_clients, 1, BATCH)), jnp.int32),
      mask=jnp.ones((num_clients, 1, BATCH), bool),
      num_examples=jnp.full((num_clients,), BATCH, jnp.int32))
  return make_problem(graphdef, None), params, data


def fedavg_round(problem, spec: FLSpec, **algorithm_fields) -> FederatedRound:
  """FedAvg (with ``algorithm_fields`` replaced), local SGD momentum 0.9, server SGD at 1."""
  local = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.01, momentum=0.9))
  server = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0))
  return make_round(fedavg()._replace(**algorithm_fields), problem, spec,
                    local_optimizer=make_optimizer(local),
                    local_lr=functools.partial(learning_rate_at, local),
                    server_optimizer=make_optimizer(server))


# --------------------------------------------------------------------------- personal
def personal_state(num_clients: int, model_name: str) -> dict:
  """One round and one personalized evaluation with a whole personal model per client."""
  problem, params, data = synthetic_problem(num_clients, model_name)
  fl = fedavg_round(problem, FLSpec(clients_per_round=2, local_steps=1,
                                    parallelism="sequential"), personal="all")
  state, _ = fl.jit(donate=True)(fl.init(params, data, jax.random.PRNGKey(2)), data)
  evaluate = jax.jit(functools.partial(evaluate_clients, fns=fl.fns, spec=fl.spec))
  jax.block_until_ready(evaluate(state, data, data))
  personal = sum(x.nbytes for x in jax.tree.leaves(state.client_states["personal"]))
  return {"clients": num_clients, "model": model_name,
          "params": sum(x.size for x in jax.tree.leaves(params)),
          "personal_state_gib": personal / 2**30,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def section_personal(counts, model_name: str):
  print(f"\n### Personal state: every client keeps a whole {model_name}\n\n"
        "One round of 2 sampled clients and one personalized evaluation over every client "
        "(`sequential`); each row a fresh process.\n\n"
        + table_header("clients", "model", "params / model", "personal state (GiB)",
                       "peak RSS (GiB)"), flush=True)
  for n in counts:
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", f"--personal_child={n}",
                          f"--model={model_name}"], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(table_row(r["clients"], r["model"], f"{r['params']:,}",
                    f"{r['personal_state_gib']:.2f}", f"{r['peak_rss_gib']:.2f}"), flush=True)


# --------------------------------------------------------------------------- round
def round_scratch_bytes(num_clients: int, model_name: str, strategy: str,
                        summed: bool) -> tuple[int, int]:
  """(scratch bytes of the compiled round, bytes of one model) for ``num_clients``."""
  problem, params, data = synthetic_problem(num_clients, model_name)
  fl = fedavg_round(problem, FLSpec(clients_per_round=num_clients, local_steps=1,
                                    parallelism=strategy, chunk_size=5),
                    mean_messages=summed)
  compiled = fl.jit().lower(fl.init(params, data, jax.random.PRNGKey(2)), data).compile()
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params["model"]))
  return compiled.memory_analysis().temp_size_in_bytes, model_bytes


def section_round(counts, model_name: str, strategies):
  print(f"\n### A round's scratch against clients per round: {model_name}, messages "
        "stacked or summed\n\nXLA's count of the compiled round's scratch buffers "
        "(inputs and outputs excluded); one local step per client.\n\n"
        + table_header("strategy", "clients / round", "scratch, stacked", "scratch, summed",
                       "saved", "saved / (clients × model)"), flush=True)
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  for strategy in strategies:
    for n in counts:
      stacked, model_bytes = round_scratch_bytes(n, model_name, strategy, summed=False)
      summed, _ = round_scratch_bytes(n, model_name, strategy, summed=True)
      print(table_row(strategy, n, mib(stacked), mib(summed), mib(stacked - summed),
                      f"{(stacked - summed) / (n * model_bytes):.2f}"), flush=True)
  print(f"\none {model_name}: {model_bytes / 2**20:.1f} MiB of float32 parameters")


def main(argv):
  del argv
  if _PERSONAL_CHILD.value:
    print(json.dumps(personal_state(_PERSONAL_CHILD.value, _MODEL.value)))
    return
  if unknown := set(_SECTIONS.value) - set(SECTIONS):
    raise app.UsageError(f"--sections {sorted(unknown)} not among {list(SECTIONS)}")
  print(f"# isr_jax memory benchmark\n\n{machine_description()}")
  for name in SECTIONS:
    if name not in _SECTIONS.value:
      continue
    counts = [int(c) for c in _CLIENTS.value or DEFAULT_CLIENTS[name]]
    if name == "personal":
      section_personal(counts, _MODEL.value)
    else:
      section_round(counts, _MODEL.value, _STRATEGIES.value)


if __name__ == "__main__":
  app.run(main)
