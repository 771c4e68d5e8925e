"""ISR diagnostics: term-gradient cosines, tap feature drift, adapter accuracy, and their command.

Checked jitted on LeNet-5 over scikit-learn digits against separately computed
``jax.grad``s and numpy; the command on tiny finished runs (FL with ISR, CL
without), measured from a sweep directory.
"""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags, logging
from flax import nnx
from support import digits

from experiments import isr_diagnostics as command
from experiments.configs.isr_gap import get_config
from experiments.records import run_record
from isr_jax.data import pack_clients
from isr_jax.diagnostics import (
    adapter_accuracy,
    mean_term_gradients,
    reached_leaves,
    tap_feature_drift,
    term_gradient_cosines,
    term_gradients,
    tree_cosine,
)
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.algorithms.fedavg import client_grad as fedavg_client_grad
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.losses import cross_entropy, mi_loss
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_apply, make_problem, split_model
from isr_jax.optim import make_optimizer
from isr_jax.taps import make_isr_spec
from isr_jax.train import train_and_evaluate

ALPHAS = (0.1, 0.3)  # conv1, conv2
N = 96
VALID = 90  # the last examples are padding


@pytest.fixture(scope="module")
def lenet():
  """``(apply, spec, params, batch)``: LeNet-5 with ISR at conv1 and conv2, 96 digits.

  Small random biases keep every unit off its ReLU kink and give each layer a
  non-zero gradient (fresh biases are zero: the digits' empty borders sit on it).
  """
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=True, taps=("conv1", "conv2"), mi_weight=ALPHAS,
                       ne_weight=0.01)
  keys = iter(jax.random.split(jax.random.PRNGKey(3), 16))
  model_params = {name: {**layer, "bias": 0.05 * jax.random.normal(next(keys), layer["bias"].shape)}
                  for name, layer in model_params.items()}
  params = init_params(graphdef, model_params, spec, num_classes=10, input_shape=(8, 8, 1),
                       key=jax.random.PRNGKey(1))
  train, _, _ = digits()
  batch = Batch(jnp.asarray(train.x[:N]), jnp.asarray(train.y[:N]), jnp.arange(N) < VALID)
  return make_apply(graphdef), spec, params, batch


def reference_gradients(apply, spec, params, batch):
  """``∇L_CE`` and each ``∇ α_m L_MI^m`` w.r.t. the model, each by its own ``jax.grad``."""

  def ce(model):
    return cross_entropy(apply(model, batch.x)[0], batch.y, mask=batch.mask)

  def mi(model, tap, alpha):
    z = apply(model, batch.x)[1][tap]
    return alpha * mi_loss(params["adapters"][tap], z, batch.y, mask=batch.mask)

  g_ce = jax.jit(jax.grad(ce))(params["model"])
  g_mi = {t.name: jax.jit(jax.grad(functools.partial(mi, tap=t.name, alpha=t.mi_weight)))(
      params["model"]) for t in spec.terms}
  return g_ce, g_mi


def numpy_cosine(a, b, leaves):
  """The cosine of two gradients over the named layers, flattened in numpy."""
  flat = lambda g: np.concatenate([np.ravel(np.asarray(g[layer][k], np.float64))  # noqa: E731
                                   for layer in leaves for k in ("kernel", "bias")])
  u, v = flat(a), flat(b)
  return float(u @ v / np.sqrt((u @ u) * (v @ v)))


def test_cosines_equal_those_of_separately_computed_gradients(lenet):
  apply, spec, params, batch = lenet
  g_ce, g_mi = reference_gradients(apply, spec, params, batch)
  got = jax.jit(functools.partial(term_gradient_cosines, apply, spec=spec))(params, batch=batch)
  # The MI term reaches the layers up to its tap; the cosine is taken over those.
  reaches = {"conv1": ("conv1",), "conv2": ("conv1", "conv2")}
  assert set(got) == set(reaches)
  for tap, layers in reaches.items():
    want = numpy_cosine(g_ce, g_mi[tap], layers)
    np.testing.assert_allclose(float(got[tap]), want, rtol=1e-4, atol=1e-5)
    assert -1.0 <= float(got[tap]) <= 1.0

  # The gradients themselves, in one piece and in chunks of 32 (the last one padded).
  for batch_size in (None, 32):
    ce, mi = jax.jit(functools.partial(mean_term_gradients, apply, spec=spec,
                                       batch_size=batch_size))(params, batch=batch)
    chex.assert_trees_all_close(ce, g_ce, rtol=1e-4, atol=1e-7)
    chex.assert_trees_all_close(mi, g_mi, rtol=1e-4, atol=1e-8)
    flags_ = jax.tree.map(bool, reached_leaves(mi["conv1"]))
    assert flags_ == {layer: {"kernel": layer == "conv1", "bias": layer == "conv1"}
                      for layer in params["model"]}
  chunked = jax.jit(functools.partial(term_gradient_cosines, apply, spec=spec, batch_size=32))(
      params, batch=batch)
  chex.assert_trees_all_close(chunked, got, rtol=1e-4, atol=1e-6)


def test_padding_examples_do_not_count(lenet):
  apply, spec, params, batch = lenet
  scrambled = batch._replace(x=batch.x.at[VALID:].set(3.0), y=batch.y.at[VALID:].set(0))
  f = jax.jit(functools.partial(term_gradient_cosines, apply, spec=spec))
  chex.assert_trees_all_close(f(params, batch=scrambled), f(params, batch=batch), rtol=1e-6)


def test_cosine_of_a_term_with_itself_is_one(lenet):
  apply, spec, params, batch = lenet
  g_ce, g_mi = jax.jit(functools.partial(term_gradients, apply, spec=spec))(params, batch=batch)
  for g in (g_ce, *g_mi.values()):
    where = reached_leaves(g)
    np.testing.assert_allclose(jax.jit(tree_cosine)(g, g, where), 1.0, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(tree_cosine)(g, jax.tree.map(jnp.negative, g), where),
                               -1.0, rtol=1e-6)
  # A zero gradient has no direction: undefined, not 0.
  zeros = jax.tree.map(jnp.zeros_like, g_ce)
  assert np.isnan(float(jax.jit(tree_cosine)(g_ce, zeros)))


def test_no_isr_no_terms(lenet):
  apply, _, params, batch = lenet
  assert jax.jit(functools.partial(term_gradient_cosines, apply, spec=None))(
      params, batch=batch) == {}
  assert adapter_accuracy(apply, params, None, batch.x, batch.y, batch.mask) == {}


def test_drift_is_zero_without_training_and_matches_a_hand_computation(lenet):
  apply, _, params, batch = lenet
  start = params["model"]
  drift = jax.jit(functools.partial(tap_feature_drift, apply))
  tap_names = set(apply(start, batch.x[:1])[1])
  same = drift(start, start, batch.x, batch.mask)
  assert set(same) == tap_names == {"conv1", "pool1", "conv2", "pool2", "fc1", "features"}
  assert all(float(v) == 0.0 for v in same.values())

  noise = iter(jax.random.split(jax.random.PRNGKey(5), 16))
  end = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(next(noise), p.shape), start)
  got = drift(start, end, batch.x, batch.mask)
  _, z0 = apply(start, batch.x)
  _, z1 = apply(end, batch.x)
  valid = np.asarray(batch.mask)
  for tap in tap_names:
    a = np.asarray(z0[tap], np.float64)[valid].reshape(VALID, -1)
    b = np.asarray(z1[tap], np.float64)[valid].reshape(VALID, -1)
    want = np.sum((b - a) ** 2) / np.sum(a ** 2)
    assert want > 0
    np.testing.assert_allclose(float(got[tap]), want, rtol=1e-4)
  chunked = jax.jit(functools.partial(tap_feature_drift, apply, batch_size=25))(
      start, end, batch.x, batch.mask)
  chex.assert_trees_all_close(chunked, got, rtol=1e-5)

  # conv1 scaled by 1.1 (kernel and bias): ReLU and max pooling are positively
  # homogeneous, so conv1 and pool1 grow by exactly 10 %: drift 0.1² = 0.01.
  scaled = {**start, "conv1": jax.tree.map(lambda p: 1.1 * p, start["conv1"])}
  got = drift(start, scaled, batch.x, batch.mask)
  np.testing.assert_allclose([float(got["conv1"]), float(got["pool1"])], [0.01, 0.01], rtol=1e-4)


def test_adapter_accuracy_matches_numpy(lenet):
  apply, spec, params, batch = lenet
  # Adapters a few steps towards their tap's labels, so the accuracies are not all 0.1.
  adapters = params["adapters"]
  _, taps = apply(params["model"], batch.x)
  step = jax.jit(lambda a: jax.tree.map(lambda p, g: p - 2.0 * g, a, jax.grad(
      lambda a: sum(mi_loss(a[t], taps[t], batch.y) for t in a))(a)))
  for _ in range(100):
    adapters = step(adapters)
  params = {**params, "adapters": adapters}
  for batch_size in (None, 40):
    got = jax.jit(functools.partial(adapter_accuracy, apply, spec=spec, batch_size=batch_size))(
        params, x=batch.x, y=batch.y, mask=batch.mask)
    assert set(got) == {"conv1", "conv2"}
    valid = np.asarray(batch.mask)
    for tap, value in got.items():
      pooled = np.asarray(taps[tap], np.float64).mean(axis=(1, 2))  # global average pool
      a = {k: np.asarray(v, np.float64) for k, v in adapters[tap].items()}
      predicted = np.argmax(pooled @ a["kernel"] + a["bias"], axis=1)
      want = np.mean(predicted[valid] == np.asarray(batch.y)[valid])
      np.testing.assert_allclose(float(value), want, rtol=1e-6)
      assert 0.2 < want <= 1.0


def test_local_update_is_the_rounds_fedavg_client():
  """The command's client training is what the round's trainer runs for FedAvg."""
  train, _, _ = digits()
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, model_params = split_model(net)
  spec = make_isr_spec(net.tap_names, enabled=True, num_taps=2, spacing=2, mi_weight=0.1,
                       ne_weight=0.01)
  params = init_params(graphdef, model_params, spec, num_classes=10, input_shape=(8, 8, 1),
                       key=jax.random.PRNGKey(1))
  problem = make_problem(graphdef, spec)
  cdata = jax.tree.map(lambda a: jnp.asarray(a)[0],
                       pack_clients(train.x, train.y, [np.arange(45)], 16))  # 3 batches, 3 pads
  cfg = get_config("fl,local").client_optimizer
  optimizer = make_optimizer(cfg)
  key, lr = jax.random.PRNGKey(9), jnp.float32(0.02)
  for epochs, steps in ((2, 0), (1, 4)):
    fl_spec = FLSpec(clients_per_round=1, local_epochs=epochs, local_steps=steps)
    fns = RoundFns(None, problem, optimizer, None, None)
    want, _, want_steps = jax.jit(lambda p, fns=fns, fl_spec=fl_spec: make_trainer(
        cdata, key, lr, fns, fl_spec).train(
            p, lambda q, b, k: fedavg_client_grad(q, {}, b, problem, k)))(params)
    got, got_steps = jax.jit(functools.partial(
        command.local_update, problem, optimizer, epochs=epochs, steps=steps))(
            params, cdata=cdata, key=key, lr=lr)
    assert int(got_steps) == int(want_steps) == (6 if steps == 0 else 4)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def _tiny(mode: str, isr: bool):
  config = get_config(f"{mode},local")
  config.isr.enabled = isr
  config.num_rounds = 1
  config.logging.tensorboard = False
  config.logging.plots = False
  return config


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A sweep directory: a finished FL run with ISR, a finished CL run without, one missing."""
  root = tmp_path_factory.mktemp("sweep")
  runs = [{"name": "fl_isr", "labels": {"mode": "fl", "isr": "on"}, "seed": 0, "settings": {}},
          {"name": "cl", "labels": {"mode": "cl", "isr": "off"}, "seed": 0, "settings": {}},
          {"name": "missing", "labels": {}, "seed": 0, "settings": {}}]
  (root / "sweep.json").write_text(json.dumps({"name": "tiny", "runs": runs}))
  train_and_evaluate(_tiny("fl", isr=True), str(root / "fl_isr"))
  train_and_evaluate(_tiny("cl", isr=False), str(root / "cl"))
  return root, runs


def run_command(*args):
  argv = ["isr_diagnostics", *args]
  verbosity = logging.get_verbosity()
  try:
    flags.FLAGS(argv)
    command.main(argv[:1])
  finally:
    flags.FLAGS.unparse_flags()
    logging.set_verbosity(verbosity)  # main() quiets absl for the whole process


def test_command_measures_the_finished_runs_of_a_sweep(sweep, capsys):
  root, runs = sweep
  run_command(f"--workdirs={root}", "--clients=3", "--examples=200", "--batch=64")
  out = capsys.readouterr().out.splitlines()
  assert out[0] == f"{root / 'missing'}: missing, not measured"
  assert len(out) == 3 and out[1].startswith(f"{root / 'fl_isr'}: round 1 (fl, ISR on)")
  assert not (root / "missing").exists()

  fl = json.loads((root / "fl_isr" / "isr_diagnostics.json").read_text())
  taps = ("conv1", "pool1", "conv2", "pool2", "fc1", "features")
  isr_taps = ("conv1", "conv2")  # the library's default for LeNet-5: 2 taps, 2-base spacing
  assert set(fl) == {"round", "mode", "isr", "examples", "clients", "client_local_steps",
                     "client_learning_rate", "local_update",
                     *(f"tap_drift/{t}" for t in taps),
                     *(f"{k}/{t}" for k in ("adapter_test_accuracy", "cos_ce_mi",
                                            "client_cos_ce_mi") for t in isr_taps)}
  assert (fl["round"], fl["mode"], fl["isr"], fl["clients"], fl["examples"]) == (1, "fl", True,
                                                                                 3, 200)
  assert fl["local_update"] == "fedavg" and fl["client_local_steps"] >= 1
  np.testing.assert_allclose(fl["client_learning_rate"], 0.01)
  for t in taps:
    assert np.isfinite(fl[f"tap_drift/{t}"]) and fl[f"tap_drift/{t}"] > 0
  for t in isr_taps:
    assert 0.0 <= fl[f"adapter_test_accuracy/{t}"] <= 1.0
    assert -1.0 <= fl[f"cos_ce_mi/{t}"] <= 1.0
    assert -1.0 <= fl[f"client_cos_ce_mi/{t}"] <= 1.0

  cl = json.loads((root / "cl" / "isr_diagnostics.json").read_text())
  assert cl == {"round": 1, "mode": "cl", "isr": False}
  # The sweep's records carry the measurement.
  assert run_record(str(root / "fl_isr"), runs[0])["isr_diagnostics"] == fl


def test_command_skips_what_it_cannot_measure(sweep, tmp_path, capsys):
  root, _ = sweep
  empty = tmp_path / "empty"
  empty.mkdir()
  run_command(f"--workdirs={root / 'cl'}", "--examples=50")  # measured once, whatever ran before
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    run_command(f"--workdirs={empty},{root / 'cl'}", "--examples=50")
  assert exit_.value.code == 1
  captured = capsys.readouterr()
  assert captured.err.strip() == (
      f"error: {empty}: no {empty / 'config.json'} (not the workdir of a run?); skipped")
  # Measured by the test before: kept, unless --redo.
  kept = root / "cl" / "isr_diagnostics.json"
  assert captured.out.strip() == (
      f"{root / 'cl'}: measured earlier, {kept} kept (--redo measures again)")
  run_command(f"--workdirs={root / 'cl'}", "--examples=50", "--redo")
  assert capsys.readouterr().out.startswith(f"{root / 'cl'}: round 1 (cl, ISR off) -> ")
