"""FedAIMS (FedAIMS paper Algorithm 1, Eq. 5/8): only the supervised block's σ and
L_CE^j classifier move in a round (line 12), even with weight decay and momentum, and
the vmapped round still matches the per-client loop; ``absent_classes="mask"`` takes
the examples of a class without a global prototype out of R, value and gradient, with
"mean"/"mse" counting only the examples kept, while ``"zero"`` is today's R."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from support import (
    assert_trees_close,
    fedaims_with,
    reference_round,
    small_setup,
    uneven_clients,
)

from isr_jax.config import default_config, resume_changes
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, ServerBroadcast
from isr_jax.fl.algorithms.fedaims import fedaims
from isr_jax.fl.registry import check_algorithm_settings, make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec

SPEC3 = FLSpec(clients_per_round=3, local_epochs=1)
# FedAIMS §5.1's local optimizer: SGD, momentum 0.9, weight decay 1e-4.
PAPER_SGD = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9,
                                           weight_decay=1e-4))
BLOCKS = ("block1", "block2", "block3")  # convnet3's intermediate blocks, in block order
NUM_CLASSES = 10


def supervised_blocks(state, fns):
  """``{client: index of its supervised block}`` of the round ``state`` is about to run."""
  ids = sample_clients(round_keys(state)[0], 6, SPEC3.clients_per_round)
  gathered = jax.tree.map(lambda a: a[ids], state.client_states["alg"])
  plan = fns.algorithm.plan_round(state.alg_state, gathered, ids)
  return {int(c): int(jnp.argmax(plan[i])) for i, c in enumerate(ids)}


def block_modules(state, client, name):
  """σ^j and the L_CE^j classifier of block ``name`` on ``client``."""
  alg = state.client_states["alg"]
  return jax.tree.map(lambda a: a[client], {"sigma": alg["sigma"][name], "ce": alg["ce"][name]})


def moved(before, after):
  """Whether every weight matrix moved (biases start at 0, which decay keeps)."""
  kernels = lambda t: [t["sigma"]["hidden"]["kernel"], t["sigma"]["out"]["kernel"],
                       t["ce"]["kernel"]]
  return all(not np.array_equal(a, b) for a, b in zip(kernels(before), kernels(after),
                                                      strict=True))


# -- Algorithm 1, line 12: only σ^{b_i} and L_CE^{b_i} train --


def test_unsampled_blocks_stay_bit_identical_under_weight_decay_and_momentum():
  """The engine freezes with a traced flag per vmapped client; ``support.reference_round``
  loops over the clients with the plan's concrete values: the two rounds agree."""
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3",
                              local=PAPER_SGD, isr=False)
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC3))
  want = state
  for _ in range(2):  # round 0: no R yet (σ moves by decay alone); round 1: R on
    block = supervised_blocks(state, fns)
    new, _ = step(state, data)
    for c, b in block.items():
      for j, name in enumerate(BLOCKS):
        before, after = block_modules(state, c, name), block_modules(new, c, name)
        if j == b:
          assert moved(before, after), (int(state.round), c, name)
        else:
          chex.assert_trees_all_equal(before, after)
    want, _ = reference_round(want, data, fns, SPEC3)
    assert_trees_close(new.params, want.params, atol=3e-5)
    assert_trees_close(new.client_states, want.client_states, atol=3e-5)
    assert_trees_close(new.alg_state, want.alg_state, atol=3e-5)
    state = new


def test_full_trains_every_block():
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse", full=True), data=data,
                              model="convnet3", local=PAPER_SGD)
  new, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC3))(state, data)
  for c in sample_clients(round_keys(state)[0], 6, SPEC3.clients_per_round).tolist():
    for name in BLOCKS:
      assert moved(block_modules(state, c, name), block_modules(new, c, name)), (c, name)


# -- Eq. 5/8 for a class without a global prototype --


def regulariser(absent_classes, reduction, count, batch):
  """``(R, ∇R)`` of one client at the broadcast model: ``R = R^m + Σ_j R^j`` (FedAIMS-Full's
  blocks, so every σ^j is in it), read from the objective's own terms."""
  alg = fedaims_with(reduction=reduction, full=True,
                          absent_classes=absent_classes)
  state, fns, _ = small_setup(isr=False, algorithm=alg, model="convnet3")
  alg = fns.algorithm
  cstate = jax.tree.map(lambda a: a[1], state.client_states["alg"])
  rng = np.random.default_rng(0)
  protos = jnp.asarray(rng.normal(size=state.alg_state["prototype"].shape), jnp.float32)
  alg_state = {"prototype": protos, "ready": jnp.asarray(True),
               "count": jnp.asarray(count, jnp.float32)}
  broadcast = ServerBroadcast(state.params, alg_state, jnp.int32(1), jnp.float32(0.1))
  ctx = alg.client_init(broadcast, cstate, None)
  params = {**state.params, "fedaims": ctx["own"]}

  def r(p):
    _, aux = alg.client_grad(p, ctx, batch, fns.problem, None)
    return aux["fedaims/reg_last"] + aux["fedaims/aux_reg"]

  return jax.jit(jax.value_and_grad(r))(params)


def a_batch():
  data = uneven_clients()
  return Batch(data.x[1, 0], data.y[1, 0], data.mask[1, 0].at[-1].set(False))


def test_mask_drops_a_batch_of_absent_classes_from_r_and_its_gradient(reduction="mse"):
  batch = a_batch()
  labels = set(np.asarray(batch.y)[np.asarray(batch.mask)].tolist())
  count = [0.0 if k in labels else 5.0 for k in range(NUM_CLASSES)]
  value, grads = regulariser("mask", reduction, count, batch)
  assert float(value) == 0.0
  chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, grads))
  zero_value, _ = regulariser("zero", reduction, count, batch)
  assert float(zero_value) > 0  # "zero" pulls them toward σ(0)


@pytest.mark.parametrize("reduction", ["sum", "mean", "mse"])
def test_mask_is_r_over_the_examples_kept(reduction):
  """With some classes absent, ``"mask"`` on the batch is ``"zero"`` on the batch
  whose absent-class examples are padding: same sum, same normalisation."""
  batch = a_batch()
  real = np.asarray(batch.mask)
  absent = set(np.asarray(batch.y)[real][:3].tolist())
  count = [0.0 if k in absent else 5.0 for k in range(NUM_CLASSES)]
  kept = batch.mask & ~jnp.isin(batch.y, jnp.asarray(sorted(absent)))
  assert 0 < int(kept.sum()) < int(real.sum())
  got = regulariser("mask", reduction, count, batch)
  want = regulariser("zero", reduction, count, batch._replace(mask=kept))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  assert_trees_close(got[1], want[1], atol=1e-7, rtol=1e-5)


def test_mask_round_keeps_the_global_counts_and_sends_presence_down():
  data = uneven_clients()
  zero, _, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3")
  assert set(zero.alg_state) == {"prototype", "ready"}  # "zero": the state of before
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse", absent_classes="mask"),
                              data=data, model="convnet3")
  np.testing.assert_array_equal(state.alg_state["count"], np.zeros(NUM_CLASSES))
  new, m = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC3))(state, data)
  sampled = np.asarray(sample_clients(round_keys(state)[0], 6, SPEC3.clients_per_round))
  y, mask = np.asarray(data.y)[sampled], np.asarray(data.mask)[sampled]
  np.testing.assert_array_equal(new.alg_state["count"],
                                np.bincount(y[mask], minlength=NUM_CLASSES))
  # Table 6's bytes (test_fedaims.py) plus, down, one presence byte per class.
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  travels = count(state.params) - count(state.params["model"]["head"])
  d_m = 64  # convnet3 on 8×8: features = 1·1·64
  assert float(m["comm/up_bytes"]) == 3 * 4 * (travels + NUM_CLASSES * d_m + NUM_CLASSES)
  assert float(m["comm/down_bytes"]) == 3 * (4 * (travels + NUM_CLASSES * d_m) + NUM_CLASSES)


# -- the setting --


@pytest.mark.parametrize("name", ["fedaims", "fedaims_full"])
def test_absent_classes_setting(name):
  c = default_config()
  c.fl.algorithm = name
  assert c.fl[name].absent_classes == "zero"  # the runs of before
  c.fl[name].absent_classes = "drop"
  with pytest.raises(ConfigError, match=rf"fl.{name}.absent_classes='drop' is not one of "
                                        r"\['mask', 'zero'\]"):
    make_algorithm(c)
  c.fl[name].absent_classes = "mask"
  check_algorithm_settings(c)
  with pytest.raises(ValueError, match="absent_classes"):
    fedaims(absent_classes="drop", problem=None)
  # A run saved before the setting existed resumes: it ran "zero".
  new = default_config()
  new.fl.algorithm = name
  saved = json.loads(new.to_json_best_effort())
  del saved["fl"][name]["absent_classes"]
  assert resume_changes(saved, new) == ([], False)
  new.fl[name].absent_classes = "mask"
  assert resume_changes(saved, new)[0] == [f"fl.{name}.absent_classes: 'zero' → 'mask'"]
