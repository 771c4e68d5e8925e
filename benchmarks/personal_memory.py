r"""Peak memory of personal state: N clients each keeping a whole ResNet-18.

  python -m benchmarks.personal_memory                  # 10 and 100 clients
  python -m benchmarks.personal_memory --clients=100 --model=resnet18

Each row runs in a fresh process: it builds the state of a run whose clients
keep a whole personal model (``personal="all"``, the worst case of the
personalized methods: Local; Ditto's ``v_i`` is the same size), compiles and
runs one round (2 sampled clients, one local step each) and one personalized
evaluation over every client, and reports the personal state's bytes (from
shapes) and the process's peak resident memory. Inputs are synthetic random
32×32×3 images (only memory is measured); no dataset is read.
"""

from __future__ import annotations

import functools
import json
import platform
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

_CLIENTS = flags.DEFINE_list("clients", ["10", "100"], "Client counts, one process each.")
_MODEL = flags.DEFINE_string("model", "resnet18", "Model whose whole copy each client keeps.")
_ONE = flags.DEFINE_integer("one", 0, "Internal: measure this many clients in this process.")


def measure(num_clients: int, model_name: str) -> dict:
  from isr_jax.data.packing import ClientData
  from isr_jax.fl.algorithms.fedavg import fedavg
  from isr_jax.fl.evaluate_clients import evaluate_clients
  from isr_jax.fl.round import FLSpec, RoundFns, fl_round, init_client_states
  from isr_jax.models import create_model
  from isr_jax.objective import init_params, make_problem, split_model
  from isr_jax.optim import learning_rate_at, make_optimizer
  from isr_jax.state import TrainState

  shape, k, batch = (32, 32, 3), 10, 4
  net = create_model(model_name, num_classes=k, input_shape=shape, rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, None, num_classes=k, input_shape=shape,
                       key=jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  data = ClientData(
      x=jnp.asarray(rng.standard_normal((num_clients, 1, batch, *shape), np.float32)),
      y=jnp.asarray(rng.integers(0, k, (num_clients, 1, batch)), jnp.int32),
      mask=jnp.ones((num_clients, 1, batch), bool),
      num_examples=jnp.full((num_clients,), batch, jnp.int32))
  algorithm = fedavg()._replace(personal="all")
  opt_config = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.01, momentum=0.9))
  server = ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0))
  fns = RoundFns(algorithm, make_problem(graphdef, None), make_optimizer(opt_config),
                 functools.partial(learning_rate_at, opt_config), make_optimizer(server))
  state = TrainState(params=params, opt_state=fns.server_optimizer.init(params),
                     alg_state={}, client_states=init_client_states(algorithm, params, data, True),
                     rng=jax.random.PRNGKey(2), round=jnp.zeros((), jnp.int32),
                     alpha=jnp.zeros((), jnp.float32))
  spec = FLSpec(clients_per_round=2, local_steps=1, parallelism="sequential")
  state, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=spec), donate_argnums=0)(
      state, data)
  metrics = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=spec))(state, data, data)
  jax.block_until_ready(metrics)
  personal = sum(x.nbytes for x in jax.tree.leaves(state.client_states["personal"]))
  return {"clients": num_clients, "model": model_name,
          "params": sum(x.size for x in jax.tree.leaves(params)),
          "personal_state_gib": personal / 2**30,
          "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(measure(_ONE.value, _MODEL.value)))
    return
  rows = []
  for n in _CLIENTS.value:
    out = subprocess.run([sys.executable, "-m", "benchmarks.personal_memory", f"--one={n}",
                          f"--model={_MODEL.value}"], capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
  print("| clients | model | params / model | personal state (GiB) | peak RSS (GiB) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['clients']} | {r['model']} | {r['params']:,} | {r['personal_state_gib']:.2f} | "
          f"{r['peak_rss_gib']:.2f} |")


if __name__ == "__main__":
  app.run(main)
