r"""A round's time with each part of the channel on, side by side with the plain round.

  python -m benchmarks.channel                          # LeNet-5, 10 clients per round
  python -m benchmarks.channel --clients=100 --repeats=7

Every row is a FedAvg round of LeNet-5 on Fashion-MNIST-shaped synthetic
inputs (28×28×1, random: only time is measured, no dataset is read), the same
sampled clients, one local epoch of 2 batches of 32, built by
:func:`isr_jax.fl.round.make_round`; rows differ only in ``FLSpec.channel``.
The rows are compiled first, then timed round-robin
(:func:`benchmarks.harness.interleaved_times`), so the machine's drift hits
each alike and the last column, the ratio to the plain round, is what to read.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags
from flax import nnx

from benchmarks.harness import (
    interleaved_medians,
    jax_round_runner,
    machine_description,
    table_header,
    table_row,
)
from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.channel import attacks, compression, dp, robust, stragglers
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer
from isr_jax.taps import make_isr_spec

_CLIENTS = flags.DEFINE_integer("clients", 10, "Clients per round (all of them sampled).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed rounds per row (median reported).")


def rows(clients: int) -> dict[str, ChannelSpec]:
  """The channel settings timed, by row label."""
  dp_spec = functools.partial(
      dp.DPSpec, clip_norm=0.5, noise_multiplier=1.0, update_noise_multiplier=1.0,
      delta=1e-5, target_quantile=0.5, clip_learning_rate=0.2, count_noise_std=clients / 20,
      expected_clients=float(clients), sampling="fixed", sampling_rate=1.0,
      num_clients=clients, accountant="rdp", target_epsilon=0.0)
  rule = functools.partial(robust.RobustSpec, trim_fraction=0.2, byzantine=1, multi_krum=0,
                           geomedian_iterations=10, geomedian_smoothing=1e-6)
  return {
      "plain round": ChannelSpec(),
      "DP (fixed C)": ChannelSpec(dp=dp_spec(adaptive=False)),
      "DP (adaptive C)": ChannelSpec(dp=dp_spec(adaptive=True)),
      "median": ChannelSpec(robust=rule(rule="median")),
      "trimmed mean (β = 0.2)": ChannelSpec(robust=rule(rule="trimmed_mean")),
      "Krum (f = 1)": ChannelSpec(robust=rule(rule="krum")),
      "geometric median (10 steps)": ChannelSpec(robust=rule(rule="geometric_median")),
      "sign-flip attack + median": ChannelSpec(
          robust=rule(rule="median"),
          attack=attacks.AttackSpec("sign_flip", 0.2, 4.0, 10)),
      "QSGD 4 bits": ChannelSpec(compression=compression.CompressionSpec("qsgd", 4, 0.01, True)),
      "top-k 1 % + error feedback": ChannelSpec(
          compression=compression.CompressionSpec("top_k", 4, 0.01, True)),
      "stragglers (50 %) + dropouts (10 %)": ChannelSpec(
          stragglers=stragglers.StragglerSpec(0.1, 0.5, 0.1)),
  }


def synthetic_clients(clients: int, batches: int = 2, batch: int = 32) -> ClientData:
  """Random 28×28×1 inputs and labels, ``batches`` full batches per client."""
  rng = np.random.default_rng(0)
  x = rng.random((clients, batches, batch, 28, 28, 1), dtype=np.float32)
  y = rng.integers(0, 10, (clients, batches, batch)).astype(np.int32)
  mask = np.ones((clients, batches, batch), bool)
  n = np.full((clients,), batches * batch, np.int32)
  return jax.tree.map(jnp.asarray, ClientData(x, y, mask, n))


def main(argv):
  del argv
  clients = _CLIENTS.value
  net = create_model("lenet5", num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  isr = make_isr_spec(net.tap_names, enabled=False)
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, isr, num_classes=10, input_shape=(28, 28, 1),
                       key=jax.random.PRNGKey(1))
  problem = make_problem(graphdef, isr)
  data = synthetic_clients(clients)
  local = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.05, momentum=0.9))
  runners, labels, compiles = [], [], []
  for label, channel in rows(clients).items():
    federated = make_round(
        fedavg(), problem, FLSpec(clients_per_round=clients, channel=channel),
        local_optimizer=make_optimizer(local),
        local_lr=functools.partial(learning_rate_at, local))
    state = federated.init(params, data, jax.random.PRNGKey(2))
    compile_s, run = jax_round_runner(federated.jit(), state, data)
    runners.append(run)
    labels.append(label)
    compiles.append(compile_s)
  medians = interleaved_medians(runners, _REPEATS.value)
  print(machine_description())
  print(f"FedAvg round, LeNet-5, {clients} clients × 2 local steps of 32; median of "
        f"{_REPEATS.value} rounds, timed round-robin\n")
  print(table_header("channel", "round (ms)", "compile (s)", "× plain round"))
  for label, seconds, compile_s in zip(labels, medians, compiles, strict=True):
    print(table_row(label, f"{1e3 * seconds:.1f}", f"{compile_s:.1f}",
                    f"{seconds / medians[0]:.2f}"))


if __name__ == "__main__":
  app.run(main)
