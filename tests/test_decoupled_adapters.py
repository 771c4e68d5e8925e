"""Decoupled adapters (``isr.decouple_adapters``): α weighs the backbone's pull only.

The identities: the loss value is unchanged; the backbone's gradient is Eq. 5's
``α ∇_z L_MI`` (same as the literal reading); the adapter's is ``∇_φ L_MI``, i.e.
the literal reading's divided by α; α = 0 is plain training. Checked jitted on
LeNet-5 over digits, in a CL step and in an FL round of FedAvg and SCAFFOLD.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from support import digits, sgd_config, small_setup

from isr_jax.data import pack_clients
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec
from isr_jax.losses import accuracy, scale_gradient
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.taps import make_isr_spec

ALPHA = 0.1


def lenet(**spec_kwargs):
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=True, num_taps=2, spacing=2, **spec_kwargs)
  params = init_params(graphdef, model_params, spec, num_classes=10, input_shape=(8, 8, 1),
                       key=jax.random.PRNGKey(1))
  return graphdef, spec, params


def batch(n=64):
  train, _, _ = digits()
  return Batch(jnp.asarray(train.x[:n]), jnp.asarray(train.y[:n]), jnp.ones(n, bool))


@functools.partial(jax.jit, static_argnums=(0, 1))
def value_and_grads(graphdef, spec, params, b):
  problem = make_problem(graphdef, spec)
  (value, aux), grads = jax.value_and_grad(problem.loss, has_aux=True)(params, b)
  return value, aux, grads


def test_scale_gradient_is_the_identity_with_a_scaled_cotangent():
  x = jnp.arange(6.0).reshape(2, 3)
  assert (scale_gradient(x, 0.25) == x).all()
  g = jax.grad(lambda v: jnp.sum(jnp.sin(scale_gradient(v, 0.25))))(x)
  np.testing.assert_allclose(g, 0.25 * jnp.cos(x), rtol=1e-6)


def test_value_same_backbone_gradient_same_adapter_gradient_unscaled():
  b = batch()
  graphdef, decoupled, params = lenet(mi_weight=ALPHA, ne_weight=0.01)
  literal = decoupled._replace(decouple_adapters=False)
  v_d, aux_d, g_d = value_and_grads(graphdef, decoupled, params, b)
  v_l, aux_l, g_l = value_and_grads(graphdef, literal, params, b)
  assert float(v_d) == float(v_l)
  chex.assert_trees_all_equal(aux_d, aux_l)
  # Backbone: α ∇_z L_MI either way (the two differ in where α multiplies: rounding).
  chex.assert_trees_all_close(g_d["model"], g_l["model"], rtol=1e-5, atol=1e-7)
  # Adapters: unscaled ∇_φ L_MI, the literal reading's divided by α.
  assert set(g_d["adapters"]) == {"conv1", "conv2"}
  chex.assert_trees_all_close(
      g_d["adapters"], jax.tree.map(lambda g: g / ALPHA, g_l["adapters"]), rtol=1e-5,
      atol=1e-7)


def test_mi_only_gradient_matches_the_split_objective():
  """∇ = ∇[CE + α MI(sg φ, z) + MI(φ, sg z)], written out by hand with stop_gradient."""
  b = batch(32)
  graphdef, spec, params = lenet(mi_weight=ALPHA, ne_weight=0.0)
  _, _, got = value_and_grads(graphdef, spec, params, b)
  literal = make_problem(graphdef, spec._replace(decouple_adapters=False))
  sg = jax.lax.stop_gradient

  def split(p):
    frozen_adapters = {"model": p["model"], "adapters": sg(p["adapters"])}
    frozen_model = {"model": sg(p["model"]), "adapters": p["adapters"]}
    ce_plus_alpha_mi = literal.loss(frozen_adapters, b)[0]
    mi_for_adapters = (literal.loss(frozen_model, b)[0]
                       - literal.loss(sg(p), b)[1]["ce"]) / ALPHA
    return ce_plus_alpha_mi + mi_for_adapters

  want = jax.jit(jax.grad(split))(params)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-7)


def test_zero_alpha_is_plain_training_for_the_backbone():
  b = batch()
  graphdef, spec, params = lenet(mi_weight=0.0, ne_weight=0.0)
  assert params["adapters"] == {}
  plain = make_problem(graphdef, None)
  value, aux, grads = value_and_grads(graphdef, spec, params, b)
  (v_plain, _), g_plain = jax.jit(jax.value_and_grad(plain.loss, has_aux=True))(params, b)
  assert float(value) == float(v_plain) and set(aux) == {"ce", "total"}
  chex.assert_trees_all_equal(grads, g_plain)


def test_adapter_accuracy_is_logged_per_tap():
  b = batch()
  graphdef, spec, params = lenet(mi_weight=ALPHA, ne_weight=0.0)
  _, aux, _ = value_and_grads(graphdef, spec, params, b)
  assert {"mi_accuracy/conv1", "mi_accuracy/conv2"} <= set(aux)
  for tap in ("conv1", "conv2"):
    assert 0.0 <= float(aux[f"mi_accuracy/{tap}"]) <= 1.0


def test_accuracy_counts_valid_positions_only():
  logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
  labels = jnp.asarray([0, 0, 1])
  np.testing.assert_allclose(accuracy(logits, labels), 1 / 3, rtol=1e-6)
  assert float(accuracy(logits, labels, mask=jnp.asarray([True, False, False]))) == 1.0
  dense = jnp.zeros((1, 2, 2, 3)).at[..., 1].set(1.0)
  y = jnp.asarray([[[1, 255], [0, 1]]])
  np.testing.assert_allclose(accuracy(dense, y, ignore_index=255), 2 / 3, rtol=1e-6)


def _one_step_round(algorithm, decouple):
  """One FL round of one local SGD step per client (3 clients), ISR with α = ALPHA."""
  train, _, _ = digits()
  parts = [np.arange(i * 16, (i + 1) * 16) for i in range(3)]
  data = jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, 16))
  state, fns, spec = small_setup(algorithm=algorithm, data=data, local=sgd_config(lr=0.1))
  spec = spec._replace(terms=tuple(t._replace(mi_weight=ALPHA) for t in spec.terms),
                       decouple_adapters=decouple)
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  problem = make_problem(split_model(net)[0], spec)
  fns = fns._replace(problem=problem)
  step = jax.jit(functools.partial(fl_round, fns=fns,
                                   spec=FLSpec(clients_per_round=3, local_steps=1)))
  new_state, metrics = step(state, data)
  delta = jax.tree.map(jnp.subtract, new_state.params, state.params)
  return delta, metrics


def test_fl_round_moves_adapters_by_one_over_alpha_and_the_backbone_alike():
  # FedAvg's round; every algorithm trains its clients through the same objective,
  # where the decoupling lives (scale_gradient), so one algorithm is the test.
  coupled, m_c = _one_step_round(None, decouple=False)
  decoupled, m_d = _one_step_round(None, decouple=True)
  chex.assert_trees_all_close(decoupled["model"], coupled["model"], rtol=1e-4, atol=1e-7)
  # The coupled step is ~α times smaller and rounds on parameters of size ~0.3:
  # its rounding (~3e-8) divided by α is the tolerance.
  chex.assert_trees_all_close(
      decoupled["adapters"], jax.tree.map(lambda d: d / ALPHA, coupled["adapters"]),
      rtol=1e-4, atol=1e-6)
  assert {"train/mi_accuracy/conv1", "train/mi_accuracy/conv2"} <= set(m_d)
  np.testing.assert_allclose(m_d["train/mi/conv1"], m_c["train/mi/conv1"], rtol=1e-6)
