"""Hybrid CL–FL mode (methods §2): the α identities and the three schedules."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import assert_trees_close, digits, small_setup, uneven_clients
from test_algorithms import per_client_bytes

from isr_jax.centralized import cl_step
from isr_jax.data import pack_clients
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.feddyn import feddyn
from isr_jax.fl.algorithms.scaffold import scaffold
from isr_jax.fl.client import batch_schedule
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys
from isr_jax.fl.spec import FLSpec
from isr_jax.hybrid import HybridSpec, cosine, hybrid_round, mixing_weight, next_mix_weight


def cloud_data(batch_size=8):
  train, _, _ = digits()
  idx = np.arange(500, 540)
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, [idx], batch_size))


SPEC = FLSpec(clients_per_round=3, local_epochs=1)


# Stateful algorithms (server and client state) next to FedAvg: the α identities
# must hold on the whole state, not only the parameters.
ALGORITHMS = {
    "fedavg": lambda: fedavg(),
    "scaffold": lambda: scaffold(num_clients=6),
    "feddyn": lambda: feddyn(alpha=0.1, num_clients=6),
}
FIXED = HybridSpec(schedule="fixed")
ADAPTIVE = HybridSpec(schedule="adaptive", beta=0.2, mix_weight_min=0.1, adaptive_rule="paper",
                      cloud_steps=3)


@functools.cache
def _setup(name):
  state, fns, _ = small_setup(mix_weight=0.5, algorithm=ALGORITHMS[name]())
  return state, fns


def start(name, alpha):
  """``(state, fns)`` of a LeNet-5 with ISR; α lives in the state, so every α
  reuses one compiled round per (algorithm, schedule)."""
  state, fns = _setup(name)
  return state._replace(mix_weight=jnp.asarray(alpha, jnp.float32)), fns


@functools.cache
def hybrid_step(name, hybrid):
  fns = _setup(name)[1]
  return jax.jit(functools.partial(hybrid_round, fns=fns, spec=SPEC, hybrid=hybrid))


@functools.cache
def fl_step(name):
  return jax.jit(functools.partial(fl_round, fns=_setup(name)[1], spec=SPEC))


def one_cl_step(state, fns, cloud):
  """Params after one plain SGD step at η_t = 0.1 on the round's first cloud batch."""
  _, _, k_cloud = round_keys(state)
  idx, valid = batch_schedule(k_cloud, cloud.mask[0].reshape(-1), 8, epochs=1, steps=1)
  flat = lambda a: a[0].reshape((-1,) + a.shape[3:])
  batch = Batch(flat(cloud.x)[idx[0]], flat(cloud.y)[idx[0]], valid[0])
  opt = optax.sgd(0.1)
  params, _, aux = cl_step(state.params, opt.init(state.params), batch, problem=fns.problem,
                           optimizer=opt)
  return params, aux


def with_nan_inputs(data):
  return data._replace(x=jnp.full_like(data.x, jnp.nan))


def assert_cl_round(state, new, m, fns, cloud):
  """``new`` is one CL step from ``state`` and nothing else: the FL algorithm's server
  and client state, rng and α as they were; no client trained or communicated."""
  want_params, aux = one_cl_step(state, fns, cloud)
  delta_cl = jax.tree.map(lambda a, b: a - b, state.params, want_params)
  _, want_opt = fns.server_optimizer.update(delta_cl, state.opt_state, state.params)
  assert_trees_close(new.params, want_params, atol=1e-6)
  assert_trees_close(new.opt_state, want_opt, atol=1e-6)
  chex.assert_trees_all_equal(
      new._replace(params=state.params, opt_state=state.opt_state),
      state._replace(round=state.round + 1))
  m = jax.device_get(m)
  assert m["hybrid/mix_weight"] == 1.0
  assert m["comm/up_bytes"] == 0 and m["comm/down_bytes"] == 0
  assert m["fl/local_steps"] == 0 and m["fl/client_drift"] == 0
  assert m["hybrid/cos_cl_fl"] == 0 and m["hybrid/inner_cl_fl"] == 0
  # The training loss is the cloud's (the only training that ran), so train.py's
  # NaN guard still sees a diverging cloud step.
  assert m["train/loss"] == m["cloud/loss"] == pytest.approx(float(aux["total"]), rel=1e-5)
  assert 0 < m["train/loss"] < 10
  assert all(np.isfinite(v) for v in m.values()), m


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_alpha_one_is_one_cl_step_on_the_whole_state(name):
  # α = 1: the federated step has weight 0, so nothing of it may persist — not
  # SCAFFOLD's c/c_i, not FedDyn's h/∇L_i. NaN client inputs: the clients never ran.
  state, fns = start(name, 1.0)
  cloud = cloud_data()
  new, m = hybrid_step(name, FIXED)(state, with_nan_inputs(uneven_clients()), cloud)
  assert_cl_round(state, new, m, fns, cloud)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_alpha_zero_is_exactly_the_fl_round_on_the_whole_state(name):
  data, cloud = uneven_clients(), cloud_data()
  state, _ = start(name, 0.0)
  for _ in range(2):  # round 2 starts from non-zero SCAFFOLD/FedDyn state
    hybrid_state, hm = hybrid_step(name, FIXED)(state, data, cloud)
    fl_state, fm = fl_step(name)(state, data)
    chex.assert_trees_all_equal(hybrid_state, fl_state)
    for k, v in fm.items():
      assert float(hm[k]) == float(v), k
    state = fl_state
  # The cloud's weight is 0: even a diverged cloud step cannot leak in (0·NaN = NaN).
  hybrid_state, _ = hybrid_step(name, FIXED)(state, data, with_nan_inputs(cloud))
  chex.assert_trees_all_equal(hybrid_state, fl_step(name)(state, data)[0])


def test_alternating_is_a_cl_step_then_exactly_the_fl_round():
  # Round 0 (α = 1) leaves FedDyn's h and ∇L_i alone, so round 1 (α = 0) is exactly
  # FedDyn's round from the CL-stepped model, and θ = avg − h/α keeps holding.
  data, cloud = uneven_clients(), cloud_data()
  state, fns = start("feddyn", 0.5)
  step = hybrid_step("feddyn", HybridSpec(schedule="alternating"))
  after_cl, m = step(state, with_nan_inputs(data), cloud)
  assert_cl_round(state, after_cl, m, fns, cloud)
  after_fl, m = step(after_cl, data, cloud)
  chex.assert_trees_all_equal(after_fl, fl_step("feddyn")(after_cl, data)[0])
  assert float(m["hybrid/mix_weight"]) == 0.0
  assert float(m["comm/up_bytes"]) == 3 * per_client_bytes("feddyn", state.params)[0]


def test_adaptive_signed_rule_at_alpha_one_probes_the_clients_but_keeps_their_state():
  # The signed rule needs s = cos(g_CL, g_FL) at α = 1 (α − βs can leave 1), so the
  # clients run and communicate; their step still has weight 0, so their state is dropped.
  data, cloud = uneven_clients(), cloud_data()
  state, fns = start("scaffold", 1.0)
  hybrid = HybridSpec(schedule="adaptive", beta=0.5, mix_weight_min=0.1, adaptive_rule="signed")
  new, m = hybrid_step("scaffold", hybrid)(state, data, cloud)
  chex.assert_trees_all_equal(new.alg_state, state.alg_state)
  chex.assert_trees_all_equal(new.client_states, state.client_states)
  assert_trees_close(new.params, one_cl_step(state, fns, cloud)[0], atol=1e-6)
  cos = float(m["hybrid/cos_cl_fl"])
  assert cos != 0 and float(m["fl/local_steps"]) > 0
  up, down = per_client_bytes("scaffold", state.params)  # the probe's messages did travel
  assert (float(m["comm/up_bytes"]), float(m["comm/down_bytes"])) == (3 * up, 3 * down)
  assert float(new.mix_weight) == pytest.approx(min(1.0, max(0.1, 1.0 - 0.5 * cos)), abs=1e-6)


def test_adaptive_paper_rule_at_alpha_one_skips_the_clients():
  # α + β(1 − s) ≥ α: α = 1 is absorbing, so s is not needed and the clients never run.
  state, _ = start("fedavg", 1.0)
  new, m = hybrid_step("fedavg", ADAPTIVE)(state, with_nan_inputs(uneven_clients()),
                                           cloud_data())
  assert float(new.mix_weight) == 1.0 and float(m["comm/up_bytes"]) == 0
  assert float(m["fl/local_steps"]) == 0 and np.isfinite(float(m["train/loss"]))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new.params))


def test_fixed_mixing_is_convex_combination_of_displacements():
  data, cloud = uneven_clients(), cloud_data()
  results = {}
  for a in (0.0, 0.3, 1.0):
    results[a], _ = hybrid_step("fedavg", FIXED)(start("fedavg", a)[0], data, cloud)
  want = jax.tree.map(lambda p0, p1: 0.7 * p0 + 0.3 * p1,
                      results[0.0].params, results[1.0].params)
  assert_trees_close(results[0.3].params, want, atol=1e-6)


def test_alternating_schedule():
  spec = HybridSpec(schedule="alternating")
  alphas = [float(mixing_weight(spec, jnp.float32(0.5), jnp.int32(t))) for t in range(6)]
  assert alphas == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]


def test_fixed_schedule_never_changes_alpha():
  spec = HybridSpec(schedule="fixed")
  a = jnp.float32(0.3)
  for t, s in enumerate([1.0, -1.0, 0.2]):
    assert float(mixing_weight(spec, a, jnp.int32(t))) == pytest.approx(0.3)
    a = next_mix_weight(spec, a, jnp.float32(s))
  assert float(a) == pytest.approx(0.3)


def _adaptive_sequence(spec, alpha0, cosines):
  a, seq = jnp.float32(alpha0), []
  for s in cosines:
    a = next_mix_weight(spec, a, jnp.float32(s))
    seq.append(round(float(a), 6))
  return seq


def test_adaptive_paper_rule_only_grows_and_clips():
  # α_{t+1} = clip(α_t + β(1 − s), α_min, 1) — Algorithm 1 line 42.
  spec = HybridSpec(schedule="adaptive", beta=0.1, mix_weight_min=0.05, adaptive_rule="paper")
  seq = _adaptive_sequence(spec, 0.2, [1.0, 0.5, -1.0, 0.0, -1.0, -1.0, -1.0, -1.0])
  assert seq == pytest.approx([0.2, 0.25, 0.45, 0.55, 0.75, 0.95, 1.0, 1.0])


def test_adaptive_signed_rule_follows_alignment():
  # α_{t+1} = clip(α_t − β s, α_min, 1): aligned ⇒ more federated weight.
  spec = HybridSpec(schedule="adaptive", beta=0.1, mix_weight_min=0.05, adaptive_rule="signed")
  seq = _adaptive_sequence(spec, 0.2, [1.0, 1.0, 1.0, -1.0, 0.0, -0.5])
  assert seq == pytest.approx([0.1, 0.05, 0.05, 0.15, 0.15, 0.2])


def test_adaptive_round_logs_alpha_and_cosine():
  data, cloud = uneven_clients(), cloud_data()
  state, _ = start("fedavg", 0.5)
  alphas, cosines = [], []
  for _ in range(3):
    state, m = hybrid_step("fedavg", ADAPTIVE)(state, data, cloud)
    alphas.append(float(m["hybrid/mix_weight"]))
    cosines.append(float(m["hybrid/cos_cl_fl"]))
  assert alphas[0] == pytest.approx(0.5)
  for t in range(2):
    assert alphas[t + 1] == pytest.approx(min(1.0, alphas[t] + 0.2 * (1 - cosines[t])), abs=1e-6)
  assert all(-1.0 <= c <= 1.0 for c in cosines)


def test_cosine_of_zero_is_zero():
  zero = {"a": jnp.zeros(3)}
  assert float(cosine(zero, {"a": jnp.ones(3)})) == 0.0
  assert float(cosine({"a": jnp.ones(3)}, {"a": 2 * jnp.ones(3)})) == pytest.approx(1.0)
