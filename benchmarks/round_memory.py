r"""Memory of one FL round against clients per round: messages stacked or summed.

  python -m benchmarks.round_memory                           # ResNet-18, 5–40 clients
  python -m benchmarks.round_memory --model=lenet5 --clients=10,100

For each number of sampled clients, compiles one FedAvg round (``sequential``,
the CPU default, and ``chunked``) twice: with the algorithm's messages summed
client by client as they finish (``mean_messages``, what FedAvg's rule and the
algorithms built on it use) and stacked for the server as before
(``mean_messages=False``). It reports XLA's own figure for the compiled
program's scratch memory (``memory_analysis().temp_size_in_bytes``: every
intermediate buffer, not the inputs), so the table does not depend on the
allocator or on what else the machine runs; nothing is executed. Inputs are
synthetic random 32×32×3 images (one batch of 4 per client; memory only).
"""

from __future__ import annotations

import functools
import platform

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

_CLIENTS = flags.DEFINE_list("clients", ["5", "10", "20", "40"], "Clients per round.")
_MODEL = flags.DEFINE_string("model", "resnet18", "Model.")
_STRATEGIES = flags.DEFINE_list("strategies", ["sequential", "chunked"],
                                "Client parallelism (chunked: chunks of 5).")


def round_scratch_bytes(num_clients: int, model_name: str, strategy: str,
                        summed: bool) -> tuple[int, int]:
  """(scratch bytes of the compiled round, bytes of one model) for ``num_clients``."""
  from isr_jax.data.packing import ClientData
  from isr_jax.fl.algorithms.fedavg import fedavg
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
  algorithm = fedavg()._replace(mean_messages=summed)
  opt_config = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.01, momentum=0.9))
  server = make_optimizer(ml_collections.ConfigDict(dict(name="sgd", learning_rate=1.0)))
  fns = RoundFns(algorithm, make_problem(graphdef, None), make_optimizer(opt_config),
                 functools.partial(learning_rate_at, opt_config), server)
  spec = FLSpec(clients_per_round=num_clients, local_steps=1, parallelism=strategy,
                chunk_size=5)
  state = TrainState(params=params, opt_state=server.init(params), alg_state={},
                     client_states=init_client_states(algorithm, params, data, True),
                     rng=jax.random.PRNGKey(2), round=jnp.zeros((), jnp.int32),
                     alpha=jnp.ones(()))
  compiled = jax.jit(functools.partial(fl_round, fns=fns, spec=spec)).lower(state, data).compile()
  model_bytes = sum(x.nbytes for x in jax.tree.leaves(params["model"]))
  return compiled.memory_analysis().temp_size_in_bytes, model_bytes


def main(argv):
  del argv
  counts = [int(c) for c in _CLIENTS.value]
  print(f"machine: {platform.machine()}; backend {jax.default_backend()}; jax {jax.__version__}")
  print(f"\n| {_MODEL.value} | clients / round | scratch, stacked | scratch, summed | "
        "saved | saved / (clients × model) |")
  print("|---|---|---|---|---|---|")
  for strategy in _STRATEGIES.value:
    for n in counts:
      stacked, model_bytes = round_scratch_bytes(n, _MODEL.value, strategy, summed=False)
      summed, _ = round_scratch_bytes(n, _MODEL.value, strategy, summed=True)
      print(f"| {strategy} | {n} | {stacked / 2**20:,.1f} MiB | {summed / 2**20:,.1f} MiB | "
            f"{(stacked - summed) / 2**20:,.1f} MiB | "
            f"{(stacked - summed) / (n * model_bytes):.2f} |", flush=True)
  print(f"\none {_MODEL.value}: {model_bytes / 2**20:.1f} MiB of float32 parameters")


if __name__ == "__main__":
  app.run(main)
