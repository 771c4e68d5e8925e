"""Ditto, FedRoD and FedALA (FedAIMS Table 2, methods §4): identities with FedAvg and with
local training through the jitted round on LeNet-5 with ISR, hand-computed updates,
per-client state that only the sampled clients change, the personalized evaluation
of each client's own model, and config validation."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import assert_trees_close, digits, small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.data import pack_clients
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, LocalProblem, LocalTrainer
from isr_jax.fl.algorithms.ditto import ditto
from isr_jax.fl.algorithms.fedala import _SAMPLE_STREAM, ala_sample, blend, fedala, learn_weights
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedrod import balanced_logits, fedrod, summed_head, with_head
from isr_jax.fl.client import batch_schedule
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.personal import is_head, select
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec
from isr_jax.fl.trainer import make_trainer
from isr_jax.losses import cross_entropy

SIZES = (7, 30, 19, 45, 12, 26)
SPEC = FLSpec(clients_per_round=3, local_epochs=1)
LR = 0.1  # support.sgd_config's local rate
STREAM = 7919  # make_trainer shuffles stream s with fold_in(key, 7919 + s)

ALGORITHMS = {
    "fedavg": fedavg,
    "ditto": lambda: ditto(lam=0.0, personal_epochs=2),
    "fedrod": lambda: fedrod(personal_epochs=2),
    "fedala": lambda: fedala(eta=1.0, fraction=0.5, layers="all"),
    "fedala_eta0": lambda: fedala(eta=0.0, fraction=0.5, layers="all"),
}


@functools.cache
def balanced_clients(per_class=2):
  """Six clients holding ``per_class`` examples of every digit: uniform label counts."""
  train, _, _ = digits()
  by_class = [np.flatnonzero(train.y == c) for c in range(10)]
  parts = [np.concatenate([idx[i * per_class:(i + 1) * per_class] for idx in by_class])
           for i in range(len(SIZES))]
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, batch_size=8))


def data_of(kind):
  return uneven_clients(SIZES) if kind == "uneven" else balanced_clients()


@functools.cache
def run(name, kind="uneven", rounds=2):
  """``(states, fns)``: ``rounds`` jitted FL rounds of LeNet-5 with ISR on digits."""
  data = data_of(kind)
  state, fns, _ = small_setup(isr=True, algorithm=ALGORITHMS[name](), data=data)
  engine = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))
  states = [state]
  for _ in range(rounds):
    states.append(engine(states[-1], data)[0])
  return states, fns


def sampled(state):
  return set(np.asarray(sample_clients(round_keys(state)[0], len(SIZES), 3)).tolist())


def row(tree, c):
  return jax.tree.map(lambda a: a[c], tree)


def client_key(state, c):
  return jax.random.fold_in(round_keys(state)[1], c)


def flat(a):
  return a.reshape((-1,) + a.shape[2:])


def plain_sgd(params, grad, x, y, idx, valid, lr=LR):
  """Reference local training: a Python loop of plain optax SGD steps."""
  opt = optax.sgd(lr)
  opt_state = opt.init(params)
  grad = jax.jit(grad)
  for t in range(idx.shape[0]):
    if bool(valid[t].any()):
      updates, opt_state = opt.update(grad(params, Batch(x[idx[t]], y[idx[t]], valid[t])),
                                      opt_state, params)
      params = optax.apply_updates(params, updates)
  return params


def hand_accuracy(predicts, data):
  """Mean over clients and example-weighted accuracy of ``predicts[c]`` on client ``c``'s rows."""
  correct, count = [], []
  for c, predict in enumerate(predicts):
    mask = np.asarray(flat(data.mask[c]))
    hits = np.argmax(np.asarray(predict(flat(data.x[c]))), -1) == np.asarray(flat(data.y[c]))
    correct.append(np.sum(hits & mask))
    count.append(np.sum(mask))
  acc = [a / n for a, n in zip(correct, count, strict=True)]
  return np.mean(acc), np.sum(correct) / np.sum(count)


def personal_accuracy(states, fns, data):
  ev = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=SPEC))(states[-1], data, data)
  return float(ev["accuracy_mean"]), float(ev["accuracy_weighted"])


def assert_unsampled_unchanged(states, key="alg"):
  """Sampled clients' state changes, everyone else's is bit-identical, round by round."""
  for before, after in zip(states[:-1], states[1:], strict=True):
    chosen = sampled(before)
    for c in range(len(SIZES)):
      old, new = row(before.client_states[key], c), row(after.client_states[key], c)
      if c in chosen:
        assert not all(jax.tree.leaves(jax.tree.map(jnp.array_equal, old, new))), c
      else:
        chex.assert_trees_all_equal(old, new)


# ---------------------------------------------------------------- Ditto


def test_ditto_global_model_is_fedavg():
  # The global run is FedAvg's local SGD on the same shuffle, whatever v_k does.
  assert_trees_close(run("ditto")[0][-1].params, run("fedavg")[0][-1].params, atol=1e-6,
                     rtol=1e-6)


def test_ditto_with_zero_lambda_personal_model_is_local_training():
  # λ = 0: each sampled client's v_k is plain local SGD from its previous v_k for E_p = 2
  # epochs on its own shuffle; in round 2 a client sampled twice continues its own v_k.
  states, fns = run("ditto")
  data = data_of("uneven")
  grad = lambda p, b: jax.grad(lambda q: fns.problem.loss(q, b)[0])(p)
  continued = 0
  for before, after in zip(states[:-1], states[1:], strict=True):
    for c in sampled(before):
      v_prev = row(before.client_states["alg"]["v"], c)
      key = jax.random.fold_in(client_key(before, c), STREAM + 1)
      idx, valid = batch_schedule(key, flat(data.mask[c]), data.batch_size, epochs=2, steps=0)
      want = plain_sgd(v_prev, grad, flat(data.x[c]), flat(data.y[c]), np.asarray(idx),
                       np.asarray(valid))
      assert_trees_close(row(after.client_states["alg"]["v"], c), want, atol=2e-5)
      continued += before is not states[0] and c in sampled(states[0])
  assert continued > 0
  assert_unsampled_unchanged(states)


def test_ditto_personal_step_by_hand():
  # z = x·w, L = ½ mean (z − y)², x = I, y = (0, 1); one SGD step (lr 0.5) per run.
  # Global: w^t = (1, 2), ∇F = (0.5, 0.5) ⇒ w_k = (0.75, 1.75).
  # Personal: v = (3, −1), ∇F(v) = (1.5, −1), λ (v − w^t) = 2·(2, −3) ⇒ v' = (0.25, 2.5).
  def apply(model, x):
    return x @ model["w"], {}

  def objective(z, taps, adapters, batch):
    loss = 0.5 * jnp.mean((z - batch.y) ** 2)
    return loss, {"total": loss}

  problem = LocalProblem(apply=apply, objective=objective)
  batch = Batch(jnp.eye(2), jnp.array([0.0, 1.0]), jnp.array([True, True]))
  calls = []

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0):
    calls.append((epochs, stream))
    grads, aux = grad_fn(start, batch, None)
    return jax.tree.map(lambda p, g: p - 0.5 * g, start, grads), aux, jnp.int32(1)

  tree = lambda w: {"model": {"w": jnp.asarray(w, jnp.float32)}, "adapters": {}}
  trainer = LocalTrainer(train=train, problem=problem, data=None, key=None)
  w_k, ctx, _, steps = ditto(lam=2.0, personal_epochs=3).local_update(
      tree([1.0, 2.0]), {"v": tree([3.0, -1.0])}, trainer)
  np.testing.assert_allclose(w_k["model"]["w"], [0.75, 1.75], atol=1e-6)
  np.testing.assert_allclose(ctx["v"]["model"]["w"], [0.25, 2.5], atol=1e-6)
  assert calls == [(None, 0), (3, 1)] and int(steps) == 1


def test_ditto_personalized_evaluation_uses_each_clients_personal_model():
  states, fns = run("ditto")
  data = data_of("uneven")
  v = states[-1].client_states["alg"]["v"]
  predicts = [lambda x, c=c: fns.problem.apply(row(v, c)["model"], x)[0]
              for c in range(len(SIZES))]
  np.testing.assert_allclose(personal_accuracy(states, fns, data), hand_accuracy(predicts, data),
                             atol=1e-6)


# ---------------------------------------------------------------- FedRoD


def test_balanced_softmax_by_hand_and_equal_to_ce_for_uniform_counts():
  logits = jnp.array([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]])
  # Uniform counts shift by exactly 0: BSM is CE bit for bit.
  chex.assert_trees_all_equal(balanced_logits(logits, jnp.array([5.0, 5.0, 5.0])), logits)
  # Counts (4, 1, 0), labels (0, 1): −log(n_y e^{z_y} / Σ_c n_c e^{z_c}), class 2 absent.
  counts = jnp.array([4.0, 1.0, 0.0])
  want = np.mean([-math.log(4 * math.e / (4 * math.e + math.e ** 2)),
                  -math.log(math.exp(-1) / (4 * math.exp(0.5) + math.exp(-1)))])
  bsm = cross_entropy(balanced_logits(logits, counts), jnp.array([0, 1]))
  np.testing.assert_allclose(bsm, want, rtol=1e-6)
  # A masked padding example whose label is an absent class stays finite, and so do the grads.
  grad = jax.grad(lambda z: cross_entropy(balanced_logits(z, counts), jnp.array([0, 2]),
                                          mask=jnp.array([True, False])))(logits)
  assert np.all(np.isfinite(grad)) and not np.any(grad[1])


def test_fedrod_generic_model_is_fedavg_when_labels_are_uniform():
  # Every client holds 2 examples of every class: BSM = CE, and the personal head's
  # E_p epochs after the generic run never reach θ or ψ.
  assert_trees_close(run("fedrod", "balanced")[0][-1].params,
                     run("fedavg", "balanced")[0][-1].params, atol=1e-6, rtol=1e-6)


def test_fedrod_local_update_by_hand():
  # Without ISR: θ, ψ by local SGD on BSM (stream 0), then φ alone by SGD on the CE of
  # h(z; ψ' + φ) = h_G(z) + h_P(z) with the trained body (stream 1, E_p = 2 epochs).
  data = uneven_clients(SIZES)
  alg = fedrod(personal_epochs=2)
  state, fns, _ = small_setup(isr=False, algorithm=alg, data=data)
  c = 3
  cdata = row(data, c)
  key = jax.random.PRNGKey(5)
  phi0 = jax.tree.map(lambda a: 0.5 * a, state.params["model"]["head"])
  ctx = alg.client_init(None, {"head": phi0}, cdata)
  local = jax.jit(lambda s, ctx, cd, k: alg.local_update(
      s, ctx, make_trainer(cd, k, jnp.float32(LR), fns, SPEC)))
  params, out, _, steps = local(state.params, ctx, cdata, key)
  x, y, mask = flat(cdata.x), flat(cdata.y), flat(cdata.mask)
  counts = np.bincount(np.asarray(y)[np.asarray(mask)], minlength=10)
  np.testing.assert_array_equal(ctx["counts"], counts)
  bsm = lambda p, b: jax.grad(lambda q: cross_entropy(
      balanced_logits(fns.problem.apply(q["model"], b.x)[0], jnp.asarray(counts, jnp.float32)),
      b.y, mask=b.mask))(p)
  idx, valid = batch_schedule(key, mask, data.batch_size, epochs=1, steps=0)
  want = plain_sgd(state.params, bsm, x, y, np.asarray(idx), np.asarray(valid))
  assert_trees_close(params, want, atol=2e-5)
  assert int(steps) == int(np.asarray(valid).any(axis=1).sum())
  pce = lambda phi, b: jax.grad(lambda f: cross_entropy(
      fns.problem.apply(summed_head(params["model"], f), b.x)[0], b.y, mask=b.mask))(phi)
  idx, valid = batch_schedule(jax.random.fold_in(key, STREAM + 1), mask, data.batch_size,
                              epochs=2, steps=0)
  assert_trees_close(out["head"], plain_sgd(phi0, pce, x, y, np.asarray(idx), np.asarray(valid)),
                     atol=2e-5)


def test_fedrod_personal_heads_and_evaluation_with_both_heads():
  states, fns = run("fedrod")
  assert_unsampled_unchanged(states)
  data = data_of("uneven")
  model = states[-1].params["model"]
  heads = states[-1].client_states["alg"]["head"]
  # The two heads' logits added, each from its own forward pass.
  predicts = [lambda x, c=c: (fns.problem.apply(model, x)[0]
                              + fns.problem.apply(with_head(model, row(heads, c)), x)[0])
              for c in range(len(SIZES))]
  np.testing.assert_allclose(personal_accuracy(states, fns, data), hand_accuracy(predicts, data),
                             atol=1e-6)


# ---------------------------------------------------------------- FedALA


def test_fedala_first_round_is_fedavg_and_eta_zero_keeps_the_global_model():
  # Round 1: every local model is the initial global one, Θ̂ = Θ, ALA is skipped.
  # Round 2: with η = 0, W stays 1 and Θ̂ = Θ bit for bit on every layer: FedAvg again.
  fedavg_states = run("fedavg")[0]
  for name in ("fedala", "fedala_eta0"):
    assert_trees_close(run(name)[0][1].params, fedavg_states[1].params, atol=1e-6, rtol=1e-6)
  assert_trees_close(run("fedala_eta0")[0][2].params, fedavg_states[2].params, atol=1e-6,
                     rtol=1e-6)
  # With η = 1 the clients of round 2 start from their own blend, and the global moves apart.
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(run("fedala")[0][2].params), jax.tree.leaves(fedavg_states[2].params),
      strict=True))
  assert gap > 1e-4


def test_fedala_state_weights_and_unsampled_clients():
  states, _ = run("fedala")
  assert_unsampled_unchanged(states)
  first, second = sampled(states[0]), sampled(states[1])
  started = np.asarray(states[2].client_states["alg"]["started"])
  # ALA ran (and left the start phase) for exactly the clients of round 2: their local
  # model (the initial one, or round 1's) differed from the global model of round 1.
  assert set(np.flatnonzero(started).tolist()) == second
  assert not np.any(np.asarray(states[1].client_states["alg"]["started"]))
  for c in range(len(SIZES)):
    w = row(states[2].client_states["alg"]["weights"], c)
    leaves = np.concatenate([np.ravel(a) for a in jax.tree.leaves(w)])
    assert leaves.min() >= 0 and leaves.max() <= 1
    assert (leaves.min() < 1) == (c in second), c
  assert first != second


def test_fedala_evaluation_with_eta_zero_is_the_global_model():
  states, fns = run("fedala_eta0")
  data = data_of("uneven")
  model = states[-1].params["model"]
  predicts = [lambda x: fns.problem.apply(model, x)[0]] * len(SIZES)
  np.testing.assert_allclose(personal_accuracy(states, fns, data), hand_accuracy(predicts, data),
                             atol=1e-6)


def test_ala_sample_draws_distinct_real_examples():
  for n, fraction, m in [(7, 0.1, 1), (45, 0.5, 22), (45, 0.1, 4), (0, 0.5, 0)]:
    mask = jnp.arange(48) < n
    idx, valid = ala_sample(jax.random.PRNGKey(n), mask, 8, fraction)
    assert idx.shape == (-(-math.ceil(48 * fraction) // 8), 8)
    chosen = np.asarray(idx)[np.asarray(valid)]
    assert len(chosen) == m and len(set(chosen.tolist())) == m and np.all(chosen < max(n, 1))


def test_blend_keeps_the_lower_layers_global():
  state, _, _ = small_setup(isr=True)
  g = state.params
  o = jax.tree.map(lambda a: a + 1.0, g)
  ones = jax.tree.map(jnp.ones_like, select(g, is_head))
  chex.assert_trees_all_equal(blend(g, o, ones, is_head), g)  # W = 1: Θ bit for bit
  half = blend(g, o, jax.tree.map(lambda w: 0.5 * w, ones), is_head)
  assert_trees_close(half["model"]["head"], jax.tree.map(lambda a: a + 0.5, g["model"]["head"]))
  chex.assert_trees_all_equal({**half["model"], "head": None}, {**g["model"], "head": None})
  chex.assert_trees_all_equal(half["adapters"], g["adapters"])


def reference_weights(problem, g, o, w, x, y, idx, valid, *, eta, started, threshold=0.1,
                      num_pre_loss=10, max_start_epochs=50):
  """The authors' ALA weight learning as a Python loop: Θ̂ = Θ_i + (Θ − Θ_i) ⊙ W,
  ``W ← clip(W − η ∇_Θ̂ L ⊙ (Θ − Θ_i), 0, 1)`` per batch on the head; epochs until
  ``len(losses) > 10`` and ``std(last 10) < 0.1`` the first time, else one."""
  loss_grad = jax.jit(jax.value_and_grad(lambda p, b: problem.loss(p, b)[0]))
  gh, oh = g["model"]["head"], o["model"]["head"]
  losses = []
  while True:
    epoch = []
    for t in range(idx.shape[0]):
      if not valid[t].any():
        continue
      head = jax.tree.map(lambda a, b, v: a + (b - a) * v, oh, gh, w)
      value, grads = loss_grad({**g, "model": {**g["model"], "head": head}},
                               Batch(x[idx[t]], y[idx[t]], valid[t]))
      w = jax.tree.map(lambda v, d, a, b: jnp.clip(v - eta * d * (b - a), 0, 1), w,
                       grads["model"]["head"], oh, gh)
      epoch.append(float(value))
    losses.append(np.mean(epoch))
    if started or len(losses) >= max_start_epochs:
      break
    if len(losses) > num_pre_loss and np.std(losses[-num_pre_loss:]) < threshold:
      break
  return w, len(losses)


@pytest.mark.parametrize("started,max_start_epochs", [(True, 50), (False, 50), (False, 4)])
def test_ala_weight_learning_against_the_authors_loop(started, max_start_epochs):
  data = uneven_clients(SIZES)
  state, fns, _ = small_setup(isr=False, data=data)
  g = state.params
  noise = jax.random.normal(jax.random.PRNGKey(3), (84, 10))
  o = {**g, "model": {**g["model"], "head": {"kernel": g["model"]["head"]["kernel"] + noise,
                                             "bias": g["model"]["head"]["bias"] - 0.3}}}
  w0 = jax.tree.map(lambda a: jnp.full_like(a, 0.9), select(g, is_head))
  c, key = 3, jax.random.PRNGKey(11)
  cdata = row(data, c)
  learn = jax.jit(lambda cd, k: learn_weights(
      g, o, w0, jnp.asarray(started), make_trainer(cd, k, jnp.float32(LR), fns, SPEC),
      part=is_head, eta=5.0, fraction=0.5, threshold=0.1, num_pre_loss=10,
      max_start_epochs=max_start_epochs))
  w, now_started, epochs = learn(cdata, key)
  idx, valid = ala_sample(jax.random.fold_in(key, _SAMPLE_STREAM), flat(cdata.mask),
                          data.batch_size, 0.5)
  want, want_epochs = reference_weights(
      fns.problem, g, o, w0["model"]["head"], flat(cdata.x), flat(cdata.y), np.asarray(idx),
      np.asarray(valid), eta=5.0, started=started, max_start_epochs=max_start_epochs)
  assert int(epochs) == want_epochs and bool(now_started)
  if started:  # later rounds: one epoch
    assert want_epochs == 1
  elif max_start_epochs == 4:  # the cap binds
    assert want_epochs == 4
  else:  # the first ALA stops on the authors' convergence test, after more than 10 epochs
    assert 10 < want_epochs < max_start_epochs
  assert_trees_close(w["model"]["head"], want, atol=1e-5)
  moved = np.concatenate([np.ravel(a - 0.9) for a in jax.tree.leaves(want)])
  assert np.abs(moved).max() > 1e-3  # the weights did move


@pytest.mark.parametrize("name", ["fedala"])
def test_vmapped_clients_equal_sequential_ones(name):
  # run() maps clients with lax.map on CPU ("auto"); GPUs vmap them, FedALA's weight
  # learning then being a batched while loop: round 2 and the evaluation must agree.
  # (Ditto's and FedRoD's local updates are plain trainer runs, whose vmapped and
  # sequential forms test_fl_round.py compares.)
  states, fns = run(name)
  data = data_of("uneven")
  vmap = SPEC._replace(parallelism="vmap")
  new, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=vmap))(states[1], data)
  assert_trees_close(new.params, states[2].params, atol=2e-5)
  assert_trees_close(new.client_states, states[2].client_states, atol=2e-5)
  ev = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=vmap))(states[2], data, data)
  np.testing.assert_allclose((float(ev["accuracy_mean"]), float(ev["accuracy_weighted"])),
                             personal_accuracy(states, fns, data), atol=1e-6)


def test_personal_state_after_rounds_survives_a_checkpoint(tmp_path):
  # Whole personal models (Ditto's v_k), personal heads (FedRoD) and FedALA's local
  # models, weights and start flags (bool) restore bit for bit.
  from isr_jax.checkpoint import checkpoint_manager, restore_latest, save, wait

  for name in ("ditto", "fedrod", "fedala"):
    state = run(name)[0][-1]
    manager = checkpoint_manager(str(tmp_path / name), keep=1)
    save(manager, 2, state)
    wait(manager)  # saves are asynchronous
    restored = restore_latest(manager, state)
    chex.assert_trees_all_equal(restored.client_states, state.client_states)
    chex.assert_trees_all_equal(restored.params, state.params)


def test_train_and_evaluate_reports_each_clients_own_model(tmp_path):
  from experiments.configs.digits import get_config
  from isr_jax.train import train_and_evaluate

  c = get_config("fl,local,isr")
  c.model.name, c.num_rounds, c.fl.local_steps = "lenet5", 2, 3
  c.fl.num_clients, c.fl.clients_per_round, c.fl.algorithm = 6, 3, "fedala"
  m = train_and_evaluate(c, str(tmp_path))["metrics"]
  assert m["personal/clients"] == 6
  for key in ("accuracy_mean", "accuracy_weighted"):
    assert 0 <= m[f"personal/{key}"] <= 1
  assert m["personal/accuracy_std"] >= 0


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("algorithm,setting,value", [
    ("ditto", "lam", -0.1), ("ditto", "personal_epochs", 0),
    ("fedrod", "personal_epochs", 0),
    ("fedala", "eta", -1.0), ("fedala", "sample_fraction", 0.0),
    ("fedala", "sample_fraction", 1.5), ("fedala", "layers", "body"),
    ("fedala", "threshold", 0.0), ("fedala", "num_pre_loss", 0),
    ("fedala", "max_start_epochs", 0),
])
def test_bad_setting_is_a_one_line_config_error(algorithm, setting, value):
  c = default_config()
  c.fl.algorithm = algorithm
  c.fl[algorithm][setting] = value
  with pytest.raises(ConfigError) as err:
    validate(c)
  message = str(err.value)
  assert f"fl.{algorithm}.{setting}" in message and "\n" not in message


def test_defaults_are_fedaims_settings():
  c = default_config()
  assert c.fl.ditto.to_dict() == {"lam": 0.1, "personal_epochs": 5}
  assert c.fl.fedrod.to_dict() == {"personal_epochs": 5}
  assert (c.fl.fedala.eta, c.fl.fedala.sample_fraction, c.fl.fedala.layers) == (0.1, 0.1, "head")
