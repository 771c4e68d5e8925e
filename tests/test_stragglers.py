"""Stragglers and dropouts (isr_jax.fl.channel.stragglers): the cut, the draw, the round."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import sgd_config, small_setup, uneven_clients

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithms.fednova import fednova
from isr_jax.fl.channel.pipeline import channel_keys
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.channel.stragglers import StragglerSpec, draw, keep_steps
from isr_jax.fl.round import make_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.optim import make_optimizer

# On, but every client stays and does all its work.
IDLE = StragglerSpec(dropout=0.0, straggler_fraction=0.0, min_work=0.1)


# ------------------------------------------------------------------------ keep_steps


@pytest.mark.parametrize("work, want", [
    (1.0, [1, 0, 1, 1, 0, 1, 0]),   # all 4 active steps
    (0.99, [1, 0, 1, 1, 0, 0, 0]),  # ⌊3.96⌋ = 3, in schedule order
    (0.5, [1, 0, 1, 0, 0, 0, 0]),   # ⌊2⌋ = 2
    (0.1, [1, 0, 0, 0, 0, 0, 0]),   # ⌊0.4⌋ = 0, but at least one
])
def test_keep_steps_by_hand(work, want):
  active = jnp.array([1, 0, 1, 1, 0, 1, 0], bool)  # padding steps in between
  got = jax.jit(keep_steps)(active, jnp.float32(work))
  np.testing.assert_array_equal(got, np.array(want, bool))


def test_keep_steps_of_a_client_without_steps_is_empty():
  assert not jnp.any(keep_steps(jnp.zeros((5,), bool), jnp.float32(0.3)))


def test_draw():
  real = jnp.arange(2000) < 1990  # the last ones pad the mesh
  key = jax.random.PRNGKey(0)
  stays, work = jax.jit(draw, static_argnums=2)(key, real, IDLE)
  np.testing.assert_array_equal(stays, real)
  np.testing.assert_array_equal(work, np.ones(2000, np.float32))
  stays, work = jax.jit(draw, static_argnums=2)(key, real, StragglerSpec(0.5, 1.0, 0.2))
  assert not jnp.any(stays & ~real)  # padding never stays
  assert abs(float(jnp.mean(stays[:1990])) - 0.5) < 0.05
  assert float(jnp.min(work)) >= 0.2 and float(jnp.max(work)) < 1.0


# ----------------------------------------------------------- the cut in the trainer


def _linear_client(n=13, slots=(5, 4), dim=3):
  """A least-squares client: ``n`` real examples in ``S × B`` slots."""
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (*slots, dim))
  y = x @ jax.random.normal(kw, (dim,))
  mask = (jnp.arange(slots[0] * slots[1]) < n).reshape(slots)
  return ClientData(x, y, mask, jnp.int32(n))


def _squared_error(params, batch, key):
  del key

  def loss(p):
    err = jnp.where(batch.mask, batch.x @ p["w"] - batch.y, 0.0)
    return jnp.sum(err ** 2) / jnp.maximum(jnp.sum(batch.mask), 1)

  value, grads = jax.value_and_grad(loss)(params)
  return grads, {"total": value}


def _train(spec: FLSpec, work):
  """The client's local run under ``spec``, cut to ``work`` (``None``: no cut)."""
  local = sgd_config(lr=0.05)
  fns = RoundFns(None, None, make_optimizer(local), lambda _: 0.05, None)

  def run(work):
    trainer = make_trainer(_linear_client(), jax.random.PRNGKey(1), jnp.float32(0.05), fns,
                           spec, work)
    params, _, num_steps = trainer.train({"w": jnp.zeros((3,))}, _squared_error)
    return params, num_steps

  return jax.jit(run)(work)


@pytest.mark.parametrize("local_steps", [0, 6], ids=["epochs", "steps"])
def test_a_full_share_of_work_changes_nothing(local_steps):
  # Steps mode: the cut leaves the trainer's all-or-none scan for the loop over
  # active steps, which must compute the same numbers.
  spec = FLSpec(clients_per_round=1, local_epochs=2, local_steps=local_steps)
  plain, cut = _train(spec, None), _train(spec, jnp.float32(1.0))
  chex.assert_trees_all_equal(plain, cut)
  assert int(plain[1]) == (8 if local_steps == 0 else 6)  # 2 epochs of ⌈13/4⌉ steps


def test_a_straggler_runs_the_first_steps_of_its_schedule():
  spec = FLSpec(clients_per_round=1, local_steps=6)
  params, steps = _train(spec, jnp.float32(0.55))
  assert int(steps) == 3  # ⌊0.55·6⌋
  # In steps mode the first 3 of 6 scheduled steps are the 3 steps of a 3-step run.
  shorter, shorter_steps = _train(spec._replace(local_steps=3), None)
  assert int(shorter_steps) == 3
  chex.assert_trees_all_close(params, shorter, rtol=1e-6, atol=1e-7)
  _, steps = _train(spec._replace(local_steps=0, local_epochs=2), jnp.float32(0.3))
  assert int(steps) == 2  # ⌊0.3·8⌋ of the 2 epochs' 8 active steps


# ------------------------------------------------------------------------ the rounds


def _round(fns, spec, algorithm=None):
  return make_round(algorithm or fns.algorithm, fns.problem, spec,
                    local_optimizer=fns.local_optimizer, local_lr=fns.local_lr,
                    server_optimizer=fns.server_optimizer)


def test_stragglers_on_but_idle_is_the_plain_round():
  base, fns, _ = small_setup(isr=False)
  data = uneven_clients()
  outs = []
  for channel in (ChannelSpec(), ChannelSpec(stragglers=IDLE)):
    built = _round(fns, FLSpec(clients_per_round=4, local_epochs=2, channel=channel))
    outs.append(built.jit()(built.init(base.params, data, jax.random.PRNGKey(0)), data))
  chex.assert_trees_all_equal(outs[0], outs[1])


def observed_fednova():
  """FedNova whose clients also keep their ``‖a_i‖₁`` (−1 before any round) in their
  state, and whose server reports the weights it read, so the test can see both."""
  alg = fednova()

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    message, _ = alg.client_final(broadcast, ctx, local_params, num_steps, client_state)
    return message, {"a": message["a"]}

  def server_update(params, alg_state, messages, weights):
    pseudo_grad, state, metrics = alg.server_update(params, alg_state, messages, weights)
    return pseudo_grad, state, {**metrics, "weights": weights}  # FedNova's own tau_eff

  return alg._replace(init_client_state=lambda params, data=None: {"a": jnp.float32(-1.0)},
                      client_final=client_final, server_update=server_update)


@pytest.fixture(scope="module")
def dropout_round():
  """FedNova, 5 local steps, every client sampled; half drop out, half of the rest straggle."""
  base, fns, _ = small_setup(isr=False)
  data = uneven_clients()
  stragglers = StragglerSpec(dropout=0.5, straggler_fraction=0.5, min_work=0.1)
  spec = FLSpec(clients_per_round=6, local_steps=5, channel=ChannelSpec(stragglers=stragglers))
  built = _round(fns, spec, observed_fednova())
  state0 = built.init(base.params, data, jax.random.PRNGKey(4))
  state1, metrics = built.jit()(state0, data)
  # What the round drew, in sampling order: who stays, and each one's steps.
  ids = np.asarray(sample_clients(round_keys(state0)[0], data.num_clients, 6))
  stays, work = draw(channel_keys(state0.rng, state0.round).lanes, jnp.ones((6,), bool),
                     stragglers)
  stays = np.asarray(stays)
  cut = np.maximum(np.floor(np.asarray(work, np.float32) * np.float32(5)), 1)
  assert 0 < stays.sum() < 6 and np.any(cut[stays] < 5)  # a seed that shows all three
  return dict(data=data, state0=state0, state1=state1, metrics=metrics, ids=ids, stays=stays,
              cut=cut)


def test_dropped_clients_keep_their_state_and_weigh_nothing(dropout_round):
  r = dropout_round
  ids, stays = r["ids"], r["stays"]
  a = np.asarray(r["state1"].client_states["alg"]["a"])
  np.testing.assert_array_equal(a[ids[~stays]], -1.0)  # no state change
  weights = np.asarray(r["metrics"]["server/weights"])
  np.testing.assert_array_equal(weights[~stays], 0.0)
  sizes = np.asarray(r["data"].num_examples)[ids]
  np.testing.assert_allclose(weights[stays], sizes[stays] / sizes[stays].sum(), rtol=1e-6)


def test_traffic_counts_only_the_clients_that_stayed(dropout_round):
  r = dropout_round
  model = sum(x.size for x in jax.tree.leaves(r["state0"].params))
  stayed = int(r["stays"].sum())
  metrics = r["metrics"]
  assert float(metrics["comm/up_bytes"]) == stayed * 4 * (model + 1)  # d_i and a_i
  assert float(metrics["comm/down_bytes"]) == stayed * 4 * model


def test_fednova_normalizes_by_the_steps_that_ran(dropout_round):
  r = dropout_round
  ids, stays, cut = r["ids"], r["stays"], r["cut"]
  a = np.asarray(r["state1"].client_states["alg"]["a"])
  np.testing.assert_array_equal(a[ids[stays]], cut[stays])  # ‖a_i‖₁ = τ_i after the cut
  metrics = r["metrics"]
  assert float(metrics["fl/local_steps"]) == pytest.approx(cut[stays].mean())
  weights = np.asarray(metrics["server/weights"])
  assert float(metrics["server/tau_eff"]) == pytest.approx(float(weights @ (cut * stays)))
