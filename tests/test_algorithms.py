"""Every registered FL algorithm: the vmapped round equals a per-client loop over
two rounds (client state gathered/scattered while the sample changes); one training
round on digits through train_and_evaluate for each kind of algorithm state and
every personalized algorithm."""

import functools
import math

import jax
import ml_collections
import numpy as np
import pytest
from support import as_float64, assert_trees_close, reference_round, small_setup, uneven_clients

from experiments.configs.digits import get_config
from isr_jax.config import default_config
from isr_jax.fl.registry import ALGORITHMS, make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec
from isr_jax.train import train_and_evaluate

# Hyper-parameters that make each algorithm's own mechanism visible in 2 rounds.
TEST_SETTINGS = {
    "fedsam": {"rho": 0.05},
    "fedasam": {"rho": 0.1},
    "fedsol": {"rho": 0.1, "adaptive": True},
    # -- test settings: drift-correction and server-optimizer algorithms --
    "fedprox": {"mu": 0.1},
    "feddyn": {"alpha": 0.1},
    "fedavgm": {"beta": 0.5},
    "fedadam": {"learning_rate": 0.01},
    "fedyogi": {"learning_rate": 0.01},
    "fedadagrad": {"learning_rate": 0.03},
    # -- test settings: representation, distillation and imbalance algorithms --
    "moon": {"mu": 1.0, "tau": 0.5},
    "fedntd": {"beta": 1.0, "tau": 2.0},
    "balancefl": {"lam": 1.0, "temperature": 2.0},
    "fedgau": {"gamma": 1.0},
    # -- test settings: personalized baselines (Ditto, FedRoD, FedALA) --
    "ditto": {"lam": 0.1, "personal_epochs": 1},
    "fedrod": {"personal_epochs": 1},
    # η = 1 (the authors' value) so that W visibly moves in round 2, on every layer.
    "fedala": {"eta": 1.0, "sample_fraction": 0.5, "layers": "all"},
    # -- test settings: personalized baselines by model split --
    "fedrep": {"head_epochs": 1},
    "fedbabu": {"finetune_epochs": 1},
    # -- test settings: FedAIMS (the printed "sum" of Eq. 5/8 diverges at lr 0.1) --
    "fedaims": {"reduction": "mse"},
    "fedaims_full": {"reduction": "mse"},
}

# The part of {"model", "adapters"} that travels, for the algorithms that keep a
# model part home (the others send everything): (head, body, adapters) -> counted.
SHARED_PARTS = {
    "local": lambda head, body, adapters: 0,
    "fedper": lambda head, body, adapters: body + adapters,
    "fedrep": lambda head, body, adapters: body + adapters,
    "fedbabu": lambda head, body, adapters: body + adapters,
    "lg_fedavg": lambda head, body, adapters: head + adapters,
}


# LeNet-5 on 8×8 digits, counted by hand: conv1 5·5·1·6 + 6, conv2 5·5·6·16 + 16,
# fc1 (2·2·16)·120 + 120, fc2 120·84 + 84, head 84·10 + 10 parameters; and the two ISR
# adapters of support.small_setup (taps conv1, conv2 → 10 classes): 6·10 + 10, 16·10 + 10.
LENET5_DIGITS = 156 + 2416 + 7800 + 10164 + 850
LENET5_ADAPTERS = 70 + 170


def per_client_bytes(name: str, params, aggregate_adapters: bool = True,
                     itemsize: int = 4) -> tuple[int, int]:
  """``(up, down)`` bytes of one sampled client, from what each algorithm sends.

  Every algorithm uploads its model delta (``P`` values of ``itemsize`` bytes); SCAFFOLD also ``Δc``
  (2P), FedNova also ``‖a_i‖₁`` and FedGau its score ``S_n`` (P + 1). SCAFFOLD
  sends ``x`` and ``c`` down (2P), the others the model (P). Personal adapters
  never travel, nor the part a personalized algorithm keeps home
  (:data:`SHARED_PARTS`: ``P`` counts only what travels).
  """
  size = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))
  head, model = size(params["model"]["head"]), size(params["model"])
  adapters = size(params["adapters"]) if aggregate_adapters else 0
  if name in ("fedaims", "fedaims_full"):
    # The head stays home; C_i^m [K, D_m] and its K counts go up, C_g^m comes down.
    d_m, k = params["model"]["head"]["kernel"].shape
    body = model - head + adapters
    return itemsize * (body + k * d_m + k), itemsize * (body + k * d_m)
  p = SHARED_PARTS.get(name, lambda h, b, a: h + b + a)(head, model - head, adapters)
  up = {"scaffold": 2 * p, "fednova": p + 1, "fedgau": p + 1}.get(name, p)
  down = 2 * p if name == "scaffold" else p
  return itemsize * up, itemsize * down


def algorithm_config(name: str) -> ml_collections.ConfigDict:
  c = default_config()
  c.fl.algorithm = name
  c.fl.num_clients = 6
  for key, value in TEST_SETTINGS.get(name, {}).items():
    c.fl[name][key] = value
  return c


# These check their vmapped round against plain loops in their own files
# (test_personalized_baselines.py, test_fedaims.py, test_fedaims_blocks.py: there
# under weight decay and momentum); here they would repeat the suite's costliest compiles.
OWN_LOOP_TESTS = {"ditto", "fedrod", "fedala", "fedaims", "fedaims_full"}
# FedAvg's clients under another server optimizer: the loop would repeat fedavg's
# clients; their server rules are checked by hand in test_drift_algorithms.py and
# test_fedexp.py (FedExP also through a jitted round, against FedAvg).
SERVER_RULE_ONLY = {"fedavgm", "fedadagrad", "fedyogi", "fedexp"}
# FedASAM is FedSAM's machinery with ASAM's scaling, which test_fedsol.py checks by hand.
SAME_MACHINERY = {"fedasam"}
# Personalized algorithms run once here, with ISR on (their own files cover ISR off);
# FedAIMS-Full is FedAIMS without the sampling (test_fedaims_blocks.py), and APFL's
# personalized evaluation is checked against its mixtures in test_apfl.py.
PERSONALIZED = {"local", "fedper", "fedrep", "lg_fedavg", "fedbabu", "ditto", "fedrod", "fedala",
                "fedaims"}


# Compared in float64. A max-pool's gradient jumps where two values of a window tie,
# and float32 rounding in two summation orders (the loop, the vmapped round) can
# route a near-tied window differently; FedRep's two local phases make the longest
# trajectories here, and on a ConvNet-3 window whose two largest values were 3e-8
# apart in exact arithmetic its round moved by 3e-5 (by 1e-2 when the rounds were
# chained). In float64 the two agree to 1e-9.
FLOAT64 = {"fedrep"}


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - OWN_LOOP_TESTS - SERVER_RULE_ONLY
                                         - SAME_MACHINERY))
def test_vmapped_round_equals_per_client_loop(name):
  x64 = name in FLOAT64
  with jax.enable_x64(x64):
    cast = as_float64 if x64 else lambda tree: tree
    data = cast(uneven_clients())
    algorithm = make_algorithm(algorithm_config(name))
    spec = FLSpec(clients_per_round=3, local_epochs=1)
    state, fns, _ = small_setup(isr=True, algorithm=algorithm, data=data, model="convnet3")
    state = cast(state)
    engine = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))
    samples = []
    for _ in range(2):
      # Each round from one state: the identity is per round, and chained rounds
      # would compound rounding through the kinks above.
      want, sampled = reference_round(state, data, fns, spec)
      state, m = engine(state, data)
      itemsize = jax.tree.leaves(state.params)[0].dtype.itemsize
      up, down = per_client_bytes(name, state.params, itemsize=itemsize)
      assert (float(m["comm/up_bytes"]), float(m["comm/down_bytes"])) == (3 * up, 3 * down)
      atol = 1e-8 if x64 else 3e-5
      assert_trees_close(state.params, want.params, atol=atol)
      assert_trees_close(state.client_states, want.client_states, atol=atol)
      assert_trees_close(state.alg_state, want.alg_state, atol=atol)
      samples.append(tuple(sorted(sampled.tolist())))
  assert samples[0] != samples[1]


# The round test above builds every algorithm from its config section and checks its
# round and bytes; train_and_evaluate adds what differs between algorithms around the
# round: their state kinds checkpointed and evaluated (none, per-client, server
# optimizer, previous local models, a perturbed step) and every personalized evaluation.
# So: those global ones with ISR off, and every personalized one with ISR on (their own
# files run them with ISR off).
THROUGH_TRAIN = {"fedavg", "scaffold", "fedadam", "moon", "fedsol"}


@pytest.mark.parametrize(("name", "isr"), [
    (name, name in PERSONALIZED) for name in sorted(THROUGH_TRAIN | PERSONALIZED)])
def test_one_round_on_digits(tmp_path, name, isr):
  c = get_config("fl,local" + (",isr" if isr else ""))
  c.model.name = "lenet5"
  c.num_rounds = 1
  c.fl.num_clients = 6
  c.fl.clients_per_round = 3
  c.fl.local_steps = 3
  c.fl.algorithm = name
  for key, value in TEST_SETTINGS.get(name, {}).items():
    c.fl[name][key] = value
  result = train_and_evaluate(c, str(tmp_path))
  m, params = result["metrics"], result["state"].params
  # One round of 3 steps learns nothing measurable (test accuracy stays near chance);
  # what it must get right is the work done and the bytes moved.
  assert math.isfinite(m["train/loss"]) and math.isfinite(m["test/loss"])
  # FedRep's head epoch comes on top of the round's 3 body steps.
  assert m["fl/local_steps"] == 3 if name != "fedrep" else m["fl/local_steps"] > 3
  assert sum(x.size for x in jax.tree.leaves(params["model"])) == LENET5_DIGITS
  up, down = per_client_bytes(name, params)
  assert (m["comm/up_bytes"], m["comm/down_bytes"]) == (3 * up, 3 * down)
  assert any(k.startswith("train/mi/") for k in m) == isr
