"""APFL (Deng, Kamani, Mahdavi 2020, Algorithm 1): its three gradients against their
closed forms, the projection of α onto [0, 1], the global model equal to FedAvg's, fixed α
left alone, the personalized evaluation of each client's mixture, and config validation;
jitted rounds of LeNet-5 with ISR on digits."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from support import assert_trees_close, small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, LocalTrainer
from isr_jax.fl.algorithms.apfl import apfl, apfl_grads, mixture
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec

SPEC = FLSpec(clients_per_round=3, local_epochs=1)
NUM_CLIENTS = 6


@functools.cache
def run(algorithm_name, rounds=2):
  """``(states, fns)`` of ``rounds`` jitted rounds from the same start."""
  algorithm = {"fedavg": fedavg, "apfl": apfl}[algorithm_name]()
  local = default_config().client_optimizer
  local.learning_rate, local.momentum, local.weight_decay = 0.1, 0.0, 0.0
  state, fns, _ = small_setup(isr=True, algorithm=algorithm, data=uneven_clients(), local=local)
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))
  states = [state]
  for _ in range(rounds):
    states.append(step(states[-1], uneven_clients())[0])
  return states, fns


def row(tree, c):
  return jax.tree.map(lambda a: a[c], tree)


def sampled(state):
  return set(np.asarray(sample_clients(round_keys(state)[0], NUM_CLIENTS, 3)).tolist())


def test_gradients_are_the_closed_forms_on_a_real_model():
  states, fns = run("apfl")
  w = states[0].params
  v = jax.tree.map(lambda a: a + 0.01 * jnp.sin(jnp.arange(a.size).reshape(a.shape)), w)
  data = uneven_clients()
  batch = Batch(data.x[1, 0], data.y[1, 0], data.mask[1, 0])
  joint = {"w": w, "v": v, "weight": jnp.float32(0.3)}
  grads, aux = jax.jit(lambda j: apfl_grads(j, batch, fns.problem))(joint)
  loss_grad = jax.grad(lambda p: fns.problem.loss(p, batch)[0])
  at_mixture = loss_grad(mixture(0.3, v, w))
  assert_trees_close(grads["w"], loss_grad(w), atol=1e-6)
  assert_trees_close(grads["v"], jax.tree.map(lambda g: 0.3 * g, at_mixture), atol=1e-6)
  want = otu.tree_vdot(otu.tree_sub(v, w), at_mixture)  # ∂f(w + α(v − w))/∂α
  np.testing.assert_allclose(float(grads["weight"]), float(want), rtol=1e-4, atol=1e-7)
  assert float(aux["total"]) == pytest.approx(float(fns.problem.loss(w, batch)[0]), rel=1e-6)


def test_global_model_is_fedavg_and_unsampled_clients_keep_their_state():
  apfl_states, _ = run("apfl")
  fedavg_states, _ = run("fedavg")
  assert_trees_close(apfl_states[-1].params, fedavg_states[-1].params, atol=1e-6, rtol=1e-6)
  for before, after in zip(apfl_states[:-1], apfl_states[1:], strict=True):
    for c in set(range(NUM_CLIENTS)) - sampled(before):
      chex.assert_trees_all_equal(row(before.client_states["alg"], c),
                                  row(after.client_states["alg"], c))


def test_mixing_weight_is_learned_by_the_sampled_clients():
  states, _ = run("apfl")
  weights = np.asarray(states[-1].client_states["alg"]["weight"])
  moved = {c for c in range(NUM_CLIENTS) if weights[c] != 0.5}
  assert moved and moved <= sampled(states[0]) | sampled(states[1])
  assert np.all((weights >= 0) & (weights <= 1))


def test_local_update_projects_the_weight_after_every_step():
  # A trainer that takes one plain step of size 10 along each gradient: α leaves [0, 1]
  # unless the local update's projection brings it back.
  calls = []

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0, project=None):
    calls.append(project)
    grads, aux = grad_fn(start, batch, None)
    stepped = jax.tree.map(lambda p, g: p - 10.0 * g, start, grads)
    return project(stepped), aux, jnp.int32(1)

  states, fns = run("apfl")
  data = uneven_clients()
  batch = Batch(data.x[1, 0], data.y[1, 0], data.mask[1, 0])
  w = states[0].params
  v = jax.tree.map(lambda a: a + 0.05 * jnp.cos(jnp.arange(a.size).reshape(a.shape)), w)
  trainer = LocalTrainer(train=train, problem=fns.problem, data=None, key=None)
  unprojected = []
  for weight in (0.0, 1.0):
    _, ctx, _, _ = apfl().local_update(w, {"v": v, "weight": jnp.float32(weight)}, trainer)
    grad = float(apfl_grads({"w": w, "v": v, "weight": jnp.float32(weight)}, batch,
                            fns.problem)[0]["weight"])
    unprojected.append(weight - 10.0 * grad)
    assert float(ctx["weight"]) == pytest.approx(np.clip(unprojected[-1], 0, 1), abs=1e-6)
  assert any(not 0 <= u <= 1 for u in unprojected)  # the projection did something
  assert len(calls) == 2 and calls[0] is not None


def test_fixed_weight_is_frozen_and_zero_weight_evaluates_the_global_model():
  # adaptive=False freezes α against every update (weight decay and momentum included) ...
  frozen = []

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0, project=None):
    frozen.extend(path[0].key for path, _ in jax.tree_util.tree_leaves_with_path(start)
                  if not trainable(path))
    return start, {}, jnp.int32(0)

  trainer = LocalTrainer(train=train, problem=None, data=None, key=None)
  params = {"model": {"w": jnp.ones(2)}, "adapters": {}}
  apfl(personal_weight=0.0, adaptive=False).local_update(
      params, {"v": params, "weight": jnp.float32(0.0)}, trainer)
  assert frozen == ["weight"]
  # ... and at α = 0 every client's personalized model is the global one.
  states, fns = run("apfl")
  state = states[-1]
  zero = state._replace(client_states={**state.client_states, "alg": {
      **state.client_states["alg"], "weight": jnp.zeros((NUM_CLIENTS,), jnp.float32)}})
  data = uneven_clients()
  ev = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=SPEC))(zero, data, data)
  plain = jax.jit(functools.partial(evaluate_clients, fns=fns._replace(algorithm=fedavg()),
                                    spec=SPEC))(zero, data, data)
  assert float(ev["accuracy_mean"]) == float(plain["accuracy_mean"])


def test_personalized_evaluation_uses_each_clients_mixture():
  states, fns = run("apfl")
  data = uneven_clients()
  state = states[-1]
  ev = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=SPEC))(state, data, data)
  accuracies = []
  for c in range(NUM_CLIENTS):
    own = row(state.client_states["alg"], c)
    model = mixture(own["weight"], own["v"], state.params)["model"]
    x, y = data.x[c].reshape((-1,) + data.x.shape[3:]), data.y[c].reshape(-1)
    mask = np.asarray(data.mask[c].reshape(-1))
    hits = np.argmax(np.asarray(fns.problem.apply(model, x)[0]), -1) == np.asarray(y)
    accuracies.append(np.sum(hits & mask) / np.sum(mask))
  np.testing.assert_allclose(float(ev["accuracy_mean"]), np.mean(accuracies), atol=1e-6)


@pytest.mark.parametrize("setting, value", [("personal_weight", 1.5), ("personal_weight", -0.1)])
def test_bad_setting_is_a_one_line_config_error(setting, value):
  config = default_config()
  config.fl.algorithm = "apfl"
  config.fl.apfl[setting] = value
  with pytest.raises(ConfigError, match=f"fl.apfl.{setting}") as e:
    validate(config)
  assert "\n" not in str(e.value)
