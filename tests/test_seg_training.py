"""Semantic segmentation end to end (experiments/configs/segmentation.py on
synthetic_streets): one FL round of every segmentation model with ISR and one hybrid
round on a Dirichlet-over-dominant-class partition through ``train_and_evaluate``
(CL and FL with and without ISR run in test_drivers.py's segmentation grid); and
one round of every registered FL algorithm on dense labels through the engine, with
a tiny dense model (the algorithms' dense-label paths are what is tested there; the
model families are tested above).

Every ``train_and_evaluate`` run is one round of a CPU-sized setting (32×64
images, 8 training images in 2 cities = 2 clients, one local step, XLA
convolutions: the im2col lowering compiles slower and is covered by the model
tests); the round's compile time dominates, so every round here is compiled
without LLVM's optimisations (``support.FAST_COMPILE_OPTIONS``: these tests check
what runs, not the numbers). Runs are cached so that a setting shared by two
tests runs once.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import fast_compiler_options
from test_algorithms import TEST_SETTINGS, algorithm_config, per_client_bytes

from experiments.configs.segmentation import MODELS, get_config
from isr_jax.data import load_dataset, pack_clients, partition
from isr_jax.errors import ConfigError
from isr_jax.fl.registry import ALGORITHMS, make_algorithm
from isr_jax.fl.round import fl_round, init_client_states
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.nn.conv import Conv
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import make_optimizer
from isr_jax.state import TrainState
from isr_jax.taps import make_isr_spec
from isr_jax.train import train_and_evaluate

# Algorithms defined for one label per example only (FedAIMS's class prototypes):
# on dense labels they must refuse with a one-line error.
CLASSIFICATION_ONLY = ("fedaims", "fedaims_full")

DEFAULTS = dict(model="deeplabv3plus", mode="fl", isr=True, algorithm="fedavg",
                partition="natural")


def seg_config(model, mode, isr, algorithm, partition):
  c = get_config(",".join([model, mode, "local", *(["isr"] if isr else [])]))
  c.num_rounds = 1
  c.dataset.image_size = (32, 64)
  c.dataset.batch_size = 4
  c.dataset.eval_batch_size = 4
  c.dataset.options.num_train = 8
  c.dataset.options.num_test = 4
  c.dataset.options.num_cities = 2
  c.model.conv_impl = "xla"
  if model == "deeplabv3plus":
    c.model.options.width_multiplier = 0.125
  c.fl.num_clients = 2
  c.fl.clients_per_round = 2
  c.fl.local_steps = 1
  c.fl.partition.method = partition
  c.fl.algorithm = algorithm
  for key, value in TEST_SETTINGS.get(algorithm, {}).items():
    c.fl[algorithm][key] = value
  return c


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("isr_jax.experiment.xla_compiler_options", fast_compiler_options)
    yield


@functools.cache
def run(root, *settings):
  workdir = root / "-".join(map(str, settings))
  return train_and_evaluate(seg_config(*settings), str(workdir))["metrics"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
  """``(**settings) -> last metrics`` of one round; equal settings run once."""
  root = tmp_path_factory.mktemp("seg")
  return lambda **settings: run(root, *{**DEFAULTS, **settings}.values())


def check_run(m, isr):
  assert math.isfinite(m["train/loss"]), m
  assert math.isfinite(m["test/mIoU"]) and 0.0 <= m["test/mIoU"] <= 1.0, m
  assert any(k.startswith("train/mi/") for k in m) == isr, sorted(m)
  assert any(k.startswith("train/ne/") for k in m) == isr, sorted(m)


# Every family with ISR (its taps, adapters and all); the plain loss is a part of the
# ISR one, and test_drivers.py's segmentation grid runs DeepLabv3+ without it.
@pytest.mark.parametrize("model", MODELS)
def test_one_fl_round_per_model(seg_run, model):
  check_run(seg_run(model=model), isr=True)


class TinySeg(nnx.Module):
  """Three convolutions and a 1×1 head; logits upsampled to the input size."""

  task = "segmentation"
  tap_names = ("conv1", "conv2", "decoder")

  def __init__(self, num_classes, rngs):
    self.conv1 = Conv(3, 8, 3, impl="xla", rngs=rngs)
    self.conv2 = Conv(8, 8, 3, strides=2, impl="xla", rngs=rngs)
    self.conv3 = Conv(8, 8, 3, impl="xla", rngs=rngs)
    self.head = Conv(8, num_classes, 1, impl="xla", rngs=rngs)

  def __call__(self, x):
    taps = {}
    h = taps["conv1"] = jax.nn.relu(self.conv1(x))
    h = taps["conv2"] = jax.nn.relu(self.conv2(h))
    h = taps["decoder"] = jax.nn.relu(self.conv3(h))
    logits = self.head(h)
    return jax.image.resize(logits, (*x.shape[:3], logits.shape[-1]), "bilinear"), taps


@functools.cache
def dense_clients():
  train, _, info = load_dataset("synthetic_streets", image_size=(16, 32), num_train=12,
                                num_test=4, num_cities=3)
  parts = partition(np.zeros(len(train.y), int), 3, "natural", seed=0, groups=train.groups)
  data = pack_clients(train.x, train.y, parts, batch_size=2)
  return jax.tree.map(jnp.asarray, data), info


# Variants whose clients run another algorithm's code unchanged on dense labels (a
# server optimizer on FedAvg's clients; FedSAM and FedASAM are FedSoL's machinery;
# Local, FedPer and LG-FedAvg train FedAvg's clients and split the model as FedRep and
# FedBABU, which run here).
SAME_CLIENT_CODE = {"fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedexp", "fedsam", "fedasam",
                    "local", "fedper", "lg_fedavg"}


# Slow (make test-all): ~20 one-round runs, each compiling a segmentation round.
@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - SAME_CLIENT_CODE))
def test_one_round_of_every_algorithm_on_dense_labels(algorithm):
  data, info = dense_clients()
  net = TinySeg(info.num_classes, nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=True, num_taps=2, mi_weight=0.5, ne_weight=0.05)
  params = init_params(graphdef, model_params, spec, num_classes=info.num_classes,
                       input_shape=info.input_shape, key=jax.random.PRNGKey(1))
  config = algorithm_config(algorithm)
  problem = make_problem(graphdef, spec, ignore_index=255, representation="decoder")
  alg = make_algorithm(config, problem)
  if algorithm in CLASSIFICATION_ONLY:
    with pytest.raises(ConfigError, match="one label per example"):
      alg.init_server_state(params, data)
    return
  local = make_optimizer(config.client_optimizer)
  server = alg.server_optimizer or make_optimizer(config.fl.server_optimizer)
  fns = RoundFns(alg, problem, local, lambda r: 0.05, server)
  state = TrainState(params, server.init(params), alg.init_server_state(params, data),
                     init_client_states(alg, params, data, True), jax.random.PRNGKey(2),
                     jnp.zeros((), jnp.int32), jnp.float32(0))
  step = jax.jit(functools.partial(fl_round, fns=fns,
                                   spec=FLSpec(clients_per_round=2, local_steps=2)),
                 compiler_options=fast_compiler_options())
  for _ in range(2):  # round 2 uses what round 1 stored per client (MOON, SCAFFOLD, ...)
    state, m = step(state, data)
  m = jax.device_get(m)
  assert np.isfinite(m["train/loss"]) and np.isfinite(m["train/ce"]), m
  assert any(k.startswith("train/mi/") for k in m) and any(k.startswith("train/ne/") for k in m)
  up, down = per_client_bytes(algorithm, state.params)
  assert (m["comm/up_bytes"], m["comm/down_bytes"]) == (2 * up, 2 * down)
  for leaf in jax.tree.leaves(state.params):
    assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.slow
def test_one_hybrid_round_on_a_dirichlet_partition(seg_run):
  # The federated half of the hybrid round is the FL round on the partition.
  check_run(seg_run(mode="hybrid", partition="dirichlet"), isr=True)
