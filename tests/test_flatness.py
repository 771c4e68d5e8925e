"""Top Hessian eigenvalue (FedSoL's flatness measure): power iteration on HVPs, and its command."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest
from absl import flags
from flax import nnx
from support import digits, driver_env

from experiments import flatness as command
from experiments.configs.digits import get_config
from isr_jax.flatness import (
    mean_over_batches,
    model_cross_entropy,
    random_unit_like,
    top_hessian_eigenvalue,
)
from isr_jax.losses import cross_entropy
from isr_jax.models import create_model
from isr_jax.nn.dense import matmul
from isr_jax.objective import make_apply, split_model
from isr_jax.train import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(__file__))
PARAMS = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((5,))}  # 17 parameters in two leaves


def quadratic(spectrum, seed=0):
  """``0.5 xᵀAx`` over :data:`PARAMS`, ``A = Q diag(spectrum) Qᵀ`` with a random orthogonal Q."""
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(17, 17)))
  a = jnp.asarray((q * np.asarray(spectrum)) @ q.T, jnp.float32)

  def loss(p):
    x = jnp.concatenate([p["a"].ravel(), p["b"]])
    return 0.5 * x @ a @ x

  return loss, q


def flat(tree):
  return jnp.concatenate([tree["a"].ravel(), tree["b"]])


def test_quadratic_with_known_spectrum():
  spectrum = np.concatenate([[4.0, 2.5], np.linspace(-2.0, 2.0, 15)])
  loss, q = quadratic(spectrum)
  r = top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(0), num_iters=500, tol=1e-7)
  np.testing.assert_allclose(r.eigenvalue, 4.0, rtol=1e-4)
  assert 1 < int(r.iterations) < 500 and float(r.relative_change) < 1e-7  # stopped by tol
  chex.assert_trees_all_equal_shapes(r.vector, PARAMS)
  # The returned vector is the top eigenvector, up to sign.
  np.testing.assert_allclose(abs(float(flat(r.vector) @ q[:, 0])), 1.0, rtol=1e-4)


def test_iteration_cap_and_stopping_rule():
  loss, _ = quadratic(np.linspace(1.0, 3.0, 17))  # close eigenvalues: slow convergence
  capped = top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(1), num_iters=3, tol=0.0)
  assert int(capped.iterations) == 3 and float(capped.relative_change) > 0
  loose = top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(1), num_iters=100, tol=0.5)
  assert int(loose.iterations) == 2  # the first step's change is inf; the second's below 0.5
  one = top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(1), num_iters=1)
  assert int(one.iterations) == 1 and float(one.relative_change) == np.inf
  with pytest.raises(ValueError, match="num_iters"):
    top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(1), num_iters=0)


def test_negative_dominant_spectrum_gives_the_largest_magnitude_eigenvalue():
  # Power iteration converges to argmax |λ|, with its sign: -6 here, not the largest λ (3).
  spectrum = np.concatenate([[-6.0, 3.0], np.linspace(-1.0, 1.0, 15)])
  loss, _ = quadratic(spectrum, seed=1)
  r = top_hessian_eigenvalue(loss, PARAMS, key=jax.random.PRNGKey(0), num_iters=500, tol=1e-7)
  np.testing.assert_allclose(r.eigenvalue, -6.0, rtol=1e-4)


def test_mean_over_batches_is_the_mean_over_all_examples():
  rng = np.random.default_rng(0)
  x, w = rng.normal(size=(10, 3)).astype(np.float32), jnp.asarray([0.5, -1.0, 2.0])

  def batch_loss(p, batch, mask):
    per_example = jnp.tanh(batch @ p) ** 2
    return jnp.sum(jnp.where(mask, per_example, 0.0)) / jnp.maximum(mask.sum(), 1)

  loss = mean_over_batches(batch_loss, x, batch_size=4)  # batches of 4, 4, 2 (+2 padding)
  want = lambda p: jnp.mean(jnp.tanh(x @ p) ** 2)  # noqa: E731
  np.testing.assert_allclose(jax.jit(loss)(w), want(w), rtol=1e-6)
  chex.assert_trees_all_close(jax.jit(jax.hessian(loss))(w), jax.hessian(want)(w), rtol=1e-5)


@pytest.fixture(scope="module")
def lenet():
  """LeNet-5 on 64 digits at a point where the loss is twice differentiable.

  Returns ``(model_params, apply, x, y)``. Freshly initialised biases are zero, which
  puts the ReLU of every all-zero input window (the digits' empty borders) exactly on
  its kink, where no Hessian exists and an HVP depends on how the program
  differentiates the kink: the same HVP inside and outside a ``lax.scan`` came out
  up to 0.6 % apart there (in float64 too), and equal off the kinks. Small random
  biases move every unit off its kink, as training does.
  """
  train, _, _ = digits()
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, params = split_model(net)
  keys = iter(jax.random.split(jax.random.PRNGKey(7), 8))
  params = {name: {**layer, "bias": 0.05 * jax.random.normal(next(keys), layer["bias"].shape)}
            for name, layer in params.items()}
  return params, make_apply(graphdef), train.x[:64], train.y[:64]


def test_lenet_top_eigenvalue_bounds_rayleigh_quotients(lenet):
  params, apply, x, y = lenet
  loss_fn = model_cross_entropy(apply, x, y, batch_size=64)
  key = jax.random.PRNGKey(0)
  r = top_hessian_eigenvalue(loss_fn, params, key=key, num_iters=300, tol=1e-5)
  assert float(r.relative_change) < 1e-5

  # The reference HVP, written out: reverse over reverse on the whole batch at once.
  def plain_loss(p):
    return cross_entropy(apply(p, jnp.asarray(x))[0], jnp.asarray(y))

  @jax.jit
  def hvp(v):
    return jax.grad(lambda p: otu.tree_vdot(jax.grad(plain_loss)(p), v))(params)

  def rayleigh_quotient(v):
    return float(otu.tree_vdot(v, hvp(v)) / otu.tree_vdot(v, v))

  lam = float(r.eigenvalue)
  assert lam > 0
  np.testing.assert_allclose(rayleigh_quotient(r.vector), lam, rtol=1e-4)
  for i in range(1, 6):  # λ_max (here also the largest |λ|) bounds every Rayleigh quotient
    assert rayleigh_quotient(random_unit_like(jax.random.PRNGKey(i), params)) <= lam

  # One step from the iteration's own start, against the reference HVP.
  start = random_unit_like(key, params)
  first = top_hessian_eigenvalue(loss_fn, params, key=key, num_iters=1)
  hv = hvp(start)
  np.testing.assert_allclose(first.eigenvalue, otu.tree_vdot(start, hv), rtol=1e-4)
  chex.assert_trees_all_close(first.vector, otu.tree_scale(1 / otu.tree_norm(hv), hv), atol=1e-6)


def test_lenet_head_block_matches_a_dense_hessian(lenet):
  # The Hessian of the loss in the output layer's 850 parameters (the rest fixed) is small
  # enough to form: its largest eigenvalue, from eigvalsh, against power iteration.
  params, apply, x, y = lenet
  features = apply(params, jnp.asarray(x))[1]["features"]

  def head_loss(head):  # the head is a custom-VJP matmul: jax.hessian (forward mode) fails
    logits = matmul(features, head["kernel"]) + head["bias"]
    return cross_entropy(logits, jnp.asarray(y))

  head = params["head"]
  flat_head, unflatten = jax.flatten_util.ravel_pytree(head)
  dense = jax.jit(jax.jacrev(jax.jacrev(lambda v: head_loss(unflatten(v)))))(flat_head)
  eigenvalues = np.linalg.eigvalsh(np.asarray(dense, np.float64))
  top = eigenvalues[np.argmax(np.abs(eigenvalues))]
  r = top_hessian_eigenvalue(head_loss, head, key=jax.random.PRNGKey(0), num_iters=1000,
                             tol=1e-7)
  np.testing.assert_allclose(r.eigenvalue, top, rtol=1e-3)


def test_command_measures_a_finished_run(tmp_path):
  config = get_config("fl,local")
  config.num_rounds = 1
  config.model.name = "lenet5"
  config.fl.num_clients = 6
  config.fl.clients_per_round = 3
  config.fl.local_steps = 3
  config.logging.plots = False
  config.logging.tensorboard = False
  run = tmp_path / "run"
  train_and_evaluate(config, str(run))

  argv = ["flatness", f"--workdirs={run}", "--examples=64", "--batch=64"]
  flags.FLAGS(argv)
  try:
    command.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
  record = json.loads((run / "flatness.json").read_text())
  assert set(record) == {"top_hessian_eigenvalue", "examples", "iterations", "relative_change",
                         "round"}
  assert np.isfinite(record["top_hessian_eigenvalue"]) and record["top_hessian_eigenvalue"] > 0
  assert record["examples"] == 64 and record["round"] == 1 and record["iterations"] >= 2


def test_command_skips_a_workdir_without_checkpoint(tmp_path):
  no_config = tmp_path / "empty"
  no_config.mkdir()
  no_checkpoint = tmp_path / "no_ckpt"
  no_checkpoint.mkdir()
  (no_checkpoint / "config.json").write_text(get_config("fl,local").to_json())
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.flatness",
       f"--workdirs={no_config},{no_checkpoint}"],
      cwd=REPO, env=driver_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines == [
      f"error: {no_config}: no {no_config / 'config.json'} (not the workdir of a run?); skipped",
      f"error: {no_checkpoint}: no checkpoint in {no_checkpoint / 'checkpoints'}; skipped",
  ]
  assert not (no_checkpoint / "checkpoints").exists()
