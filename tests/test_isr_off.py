"""ISR off (M = 0, or every α = λ = 0) is plain training, bit for bit (methods §1)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from support import digits, sgd_config, uneven_clients

from isr_jax.centralized import cl_round
from isr_jax.data import pack_clients
from isr_jax.fl.algorithm import LocalProblem
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.client import batch_schedule
from isr_jax.fl.round import fl_round, init_client_states
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.losses import cross_entropy
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_apply, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer
from isr_jax.state import TrainState
from isr_jax.taps import make_isr_spec


def plain_problem(graphdef):
  """Plain training written without any ISR code: CE of the model's logits."""

  def objective(logits, taps, adapters, batch):
    del taps, adapters
    ce = cross_entropy(logits, batch.y, mask=batch.mask)
    return ce, {"ce": ce, "total": ce}

  return LocalProblem(apply=make_apply(graphdef), objective=objective)


def setup(spec_kwargs):
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, **spec_kwargs)
  params = init_params(graphdef, model_params, spec, num_classes=10, input_shape=(8, 8, 1),
                       key=jax.random.PRNGKey(1))
  return graphdef, spec, params


def cl_state(params, optimizer):
  return TrainState(params=params, opt_state=optimizer.init(params), alg_state={},
                    client_states={}, rng=jax.random.PRNGKey(2), round=jnp.zeros((), jnp.int32),
                    mix_weight=jnp.float32(0))


def run_cl(problem, params, rounds=3):
  train, _, _ = digits()
  data = jax.tree.map(jnp.asarray,
                      pack_clients(train.x, train.y, [np.arange(300)], batch_size=32))
  cfg = sgd_config(lr=1e-3, name="adam")
  opt = make_optimizer(cfg)
  step = jax.jit(functools.partial(cl_round, problem=problem, optimizer=opt,
                                   lr_fn=functools.partial(learning_rate_at, cfg)))
  state = cl_state(params, opt)
  for _ in range(rounds):
    state, _ = step(state, data)
  return state


def test_cl_isr_off_is_bit_for_bit_plain_training():
  graphdef, spec, params = setup(dict(enabled=False))
  assert spec is None and params["adapters"] == {}
  isr_off = run_cl(make_problem(graphdef, spec), params)
  plain = run_cl(plain_problem(graphdef), params)
  chex.assert_trees_all_equal(isr_off.params, plain.params)
  chex.assert_trees_all_equal(isr_off.opt_state, plain.opt_state)


def test_all_zero_weights_are_isr_off():
  graphdef, spec, params = setup(dict(enabled=True, num_taps=3, mi_weight=0.0, ne_weight=0.0))
  assert len(spec.terms) == 3 and params["adapters"] == {}
  zero = run_cl(make_problem(graphdef, spec), params)
  plain = run_cl(plain_problem(graphdef), params)
  chex.assert_trees_all_equal(zero.params, plain.params)


def test_fl_isr_off_is_bit_for_bit_plain_fedavg():
  graphdef, spec, params = setup(dict(enabled=False))
  data = uneven_clients()
  local = sgd_config(lr=0.1)
  server_opt = make_optimizer(sgd_config(lr=1.0))
  results = []
  for problem in (make_problem(graphdef, spec), plain_problem(graphdef)):
    fns = RoundFns(fedavg(), problem, make_optimizer(local),
                   functools.partial(learning_rate_at, local), server_opt)
    state = cl_state(params, server_opt)._replace(
        client_states=init_client_states(fns.algorithm, params, data, True))
    step = jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=3)))
    for _ in range(3):
      state, _ = step(state, data)
    results.append(state.params)
  chex.assert_trees_all_equal(*results)


def test_isr_off_matches_an_independent_training_loop():
  """Against plain optax in a Python loop (tolerance: another compilation)."""
  graphdef, spec, params = setup(dict(enabled=False))
  train, _, _ = digits()
  data = jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, [np.arange(96)], 32))
  opt = make_optimizer(sgd_config(lr=0.05))
  state = cl_state(params, opt)
  new_state, _ = jax.jit(functools.partial(
      cl_round, problem=make_problem(graphdef, spec), optimizer=opt,
      lr_fn=lambda r: 0.05))(state, data)
  idx, _ = batch_schedule(jax.random.fold_in(state.rng, 0), data.mask[0].reshape(-1), 32,
                          epochs=1, steps=0)
  x = data.x[0].reshape(96, 8, 8, 1)
  y = data.y[0].reshape(96)
  apply = make_apply(graphdef)
  model = params["model"]
  tx = optax.sgd(0.05)
  opt_state = tx.init(model)
  for t in range(3):
    def loss(m, t=t):
      return optax.softmax_cross_entropy_with_integer_labels(
          apply(m, x[idx[t]])[0], y[idx[t]]).mean()
    updates, opt_state = tx.update(jax.grad(loss)(model), opt_state)
    model = optax.apply_updates(model, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               new_state.params["model"], model)
