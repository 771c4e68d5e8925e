"""Local, FedPer, FedRep, LG-FedAvg and FedBABU: what each split makes exact, jitted on
LeNet-5 with ISR on, the bytes from shapes, and the per-client evaluation (methods §4)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from support import (
    assert_trees_close,
    reference_trainer,
    sgd_config,
    small_setup,
    uneven_clients,
)

from experiments.configs.personalized import get_config
from isr_jax.client_results import read_per_client
from isr_jax.config import default_config, validate
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedbabu import fedbabu
from isr_jax.fl.algorithms.fedper import fedper
from isr_jax.fl.algorithms.fedrep import fedrep
from isr_jax.fl.algorithms.lg_fedavg import lg_fedavg
from isr_jax.fl.algorithms.local import local
from isr_jax.fl.algorithms.shared import not_head
from isr_jax.fl.client import batch_schedule
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.personal import is_head, merge
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec
from isr_jax.fl.trainer import make_trainer
from isr_jax.train import train_and_evaluate

MINE = ("local", "fedper", "fedrep", "lg_fedavg", "fedbabu")
# FedAIMS §5.1's local optimizer: momentum and weight decay are what could move a
# frozen leaf if freezing only zeroed its gradient.
FEDAIMS_SGD = ml_collections.ConfigDict(
    dict(name="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4))
NUM_CLIENTS = 6  # support.uneven_clients


def run_rounds(algorithm, *, rounds=1, clients_per_round=3, local=FEDAIMS_SGD, state=None):
  """``(states, metrics, fns, spec, data)``: ``rounds`` jitted rounds from a fresh setup."""
  data = uneven_clients()
  fresh, fns, _ = small_setup(isr=True, algorithm=algorithm, local=local)
  spec = FLSpec(clients_per_round=clients_per_round, local_epochs=1)
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))
  states, metrics = [fresh if state is None else state], []
  for _ in range(rounds):
    new, m = step(states[-1], data)
    states.append(new)
    metrics.append(jax.device_get(m))
  return states, metrics, fns, spec, data


def sampled(state, k=3):
  return set(np.asarray(sample_clients(round_keys(state)[0], NUM_CLIENTS, k)).tolist())


def head(tree):
  return tree["model"]["head"]


def body(tree):
  return {k: v for k, v in tree["model"].items() if k != "head"}


def nbytes(tree) -> int:
  """float32 bytes of ``tree``, from its shapes."""
  return 4 * sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def changed_rows(before, after):
  """Per client row: whether any leaf of its stacked state differs."""
  pairs = list(zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
  assert pairs
  return {c for c in range(NUM_CLIENTS)
          if any(not np.array_equal(a[c], b[c]) for a, b in pairs)}


def differs(a, b) -> bool:
  return any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_local_trains_each_client_from_its_own_model_and_moves_nothing_else():
  state, fns, _ = small_setup(isr=True, algorithm=local(), local=sgd_config(lr=0.1))
  # Every client's own model (ISR adapters included) starts somewhere else.
  noise = lambda a, k: a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
  own = state.client_states["personal"]
  keys = jax.random.split(jax.random.PRNGKey(9), len(jax.tree.leaves(own)))
  own = jax.tree.unflatten(jax.tree.structure(own),
                           [noise(a, k) for a, k in zip(jax.tree.leaves(own), keys, strict=True)])
  state = state._replace(client_states={**state.client_states, "personal": own})
  assert set(own) == {"model", "adapters"}
  (start, new), (m,), fns, spec, data = run_rounds(local(), local=sgd_config(lr=0.1), state=state)
  chex.assert_trees_all_equal(new.params, start.params)  # the global tree never moves
  assert m["comm/up_bytes"] == m["comm/down_bytes"] == 0.0
  who = sampled(start)
  assert changed_rows(own, new.client_states["personal"]) == who
  # Each sampled client's model is plain local SGD from its own previous model.
  _, k_clients, _ = round_keys(start)
  grad = jax.jit(lambda p, b: loss_grad(p, b, fns.problem))
  for c in who:
    row = lambda t, c=c: jax.tree.map(lambda a: a[c], t)
    trainer = reference_trainer(row(data), jax.random.fold_in(k_clients, c), 0.1, fns, spec)
    want, _, _ = trainer.train(row(own), lambda p, b, k: grad(p, b))
    assert_trees_close(row(new.client_states["personal"]), want, atol=2e-5)


def test_fedper_keeps_heads_home_and_averages_the_rest():
  (s0, s1), (m,), *_ = run_rounds(fedper())
  chex.assert_trees_all_equal(head(s1.params), head(s0.params))
  assert differs(body(s1.params), body(s0.params))
  assert differs(s1.params["adapters"], s0.params["adapters"])  # ISR adapters are shared
  before, after = s0.client_states["personal"], s1.client_states["personal"]
  assert set(after) == {"model"} and set(after["model"]) == {"head"}
  assert changed_rows(before, after) == sampled(s0)
  shared = nbytes(body(s0.params)) + nbytes(s0.params["adapters"])
  assert m["comm/up_bytes"] == m["comm/down_bytes"] == 3 * shared
  # Round 1: every client's head is the global one, so the shared part is FedAvg's.
  (_, avg), _, _, _, _ = run_rounds(fedavg())
  assert_trees_close(body(s1.params), body(avg.params), atol=1e-6)
  assert_trees_close(s1.params["adapters"], avg.params["adapters"], atol=1e-6)
  assert differs(head(avg.params), head(s0.params))


def test_lg_fedavg_keeps_bodies_home_and_averages_the_head():
  (s0, s1), (m,), *_ = run_rounds(lg_fedavg())
  chex.assert_trees_all_equal(body(s1.params), body(s0.params))
  assert differs(head(s1.params), head(s0.params))
  before, after = s0.client_states["personal"], s1.client_states["personal"]
  assert set(after) == {"model"} and set(after["model"]) == set(body(s0.params))
  assert changed_rows(before, after) == sampled(s0)
  shared = nbytes(head(s0.params)) + nbytes(s0.params["adapters"])
  assert m["comm/up_bytes"] == m["comm/down_bytes"] == 3 * shared
  (_, avg), _, _, _, _ = run_rounds(fedavg())
  assert_trees_close(head(s1.params), head(avg.params), atol=1e-6)
  assert_trees_close(s1.params["adapters"], avg.params["adapters"], atol=1e-6)


def softmax_regression_sgd(w, b, feats, labels, idx, valid, *, lr, momentum, wd):
  """The head phase by hand (float64): SGD with momentum and weight decay on the
  masked-mean cross-entropy of ``feats @ w + b``, the features fixed."""
  w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
  mw, mb = np.zeros_like(w), np.zeros_like(b)
  for t in range(idx.shape[0]):
    v = valid[t]
    if not v.any():
      continue
    f, y = feats[idx[t]], labels[idx[t]]
    z = f @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p *= v[:, None] / v.sum()
    mw = f.T @ p + wd * w + momentum * mw
    mb = p.sum(axis=0) + wd * b + momentum * mb
    w, b = w - lr * mw, b - lr * mb
  return w, b


def test_fedrep_fits_the_head_on_the_frozen_body_then_the_body_under_it():
  head_epochs = 2
  (s0, s1), (m,), fns, spec, data = run_rounds(fedrep(head_epochs), clients_per_round=1)
  (c,) = sampled(s0, k=1)
  row = lambda t: jax.tree.map(lambda a: a[c], t)
  cdata, lr = row(data), fns.local_lr(s0.round)
  key = jax.random.fold_in(round_keys(s0)[1], c)
  start = s0.params  # round 1: the client's head is the global one
  # Phase 1 on the engine's trainer: the body and the adapters stay bit for bit.
  grad = lambda p, b, k: loss_grad(p, b, fns.problem)
  fitted, _, _ = make_trainer(cdata, key, lr, fns, spec).train(
      start, grad, epochs=head_epochs, trainable=is_head, stream=1)
  chex.assert_trees_all_equal(body(fitted), body(start))
  chex.assert_trees_all_equal(fitted["adapters"], start["adapters"])
  # ... and the head it ends with, which phase 2 keeps, is softmax regression by hand.
  x = cdata.x.reshape((-1,) + cdata.x.shape[2:])
  feats = np.asarray(fns.problem.apply(start["model"], x)[1]["features"], np.float64)
  idx, valid = batch_schedule(jax.random.fold_in(key, 7919 + 1), cdata.mask.reshape(-1),
                              data.batch_size, epochs=head_epochs, steps=0)
  w, b = softmax_regression_sgd(head(start)["kernel"], head(start)["bias"], feats,
                                np.asarray(cdata.y).reshape(-1), np.asarray(idx),
                                np.asarray(valid), lr=float(lr), momentum=0.9, wd=1e-4)
  own = row(s1.client_states["personal"])["model"]["head"]
  np.testing.assert_allclose(own["kernel"], w, atol=1e-5)
  np.testing.assert_allclose(own["bias"], b, atol=1e-5)
  # Phase 2 under that head (a plain loop, head frozen) is the client's body, which
  # with one sampled client is the new global body; the global head never moves.
  trained, _, _ = reference_trainer(cdata, key, lr, fns, spec).train(
      merge(start, {"model": {"head": own}}), grad, trainable=not_head)
  chex.assert_trees_all_equal(head(trained), own)
  assert_trees_close(body(s1.params), body(trained), atol=1e-5)
  assert_trees_close(s1.params["adapters"], trained["adapters"], atol=1e-5)
  chex.assert_trees_all_equal(head(s1.params), head(s0.params))
  assert changed_rows(s0.client_states["personal"], s1.client_states["personal"]) == {c}
  assert m["comm/up_bytes"] == m["comm/down_bytes"] == nbytes(body(start)) + nbytes(
      start["adapters"])


def test_fedbabu_head_stays_at_its_initialisation_and_never_travels():
  states, metrics, fns, spec, data = run_rounds(fedbabu(), rounds=2)
  s0 = states[0]
  for s in states[1:]:
    chex.assert_trees_all_equal(head(s.params), head(s0.params))
  assert differs(body(states[-1].params), body(s0.params))
  assert differs(states[-1].params["adapters"], s0.params["adapters"])
  assert "personal" not in s0.client_states
  shared = nbytes(body(s0.params)) + nbytes(s0.params["adapters"])
  for m in metrics:
    assert m["comm/up_bytes"] == m["comm/down_bytes"] == 3 * shared
  # Local training moves the body under the frozen initial head (momentum and weight
  # decay included), never the head.
  c = 3
  cdata = jax.tree.map(lambda a: a[c], data)
  trainer = make_trainer(cdata, jax.random.PRNGKey(4), fns.local_lr(0), fns, spec)
  trained, _, _, steps = fedbabu().local_update(s0.params, {}, trainer)
  assert int(steps) > 0
  chex.assert_trees_all_equal(head(trained), head(s0.params))
  assert differs(body(trained), body(s0.params))


def per_client_accuracy(predict, test, num_clients):
  """(correct, count) per client on its real test slots, by a plain loop."""
  correct, count = [], []
  for c in range(num_clients):
    keep = np.asarray(test.mask[c]).reshape(-1)
    x = jnp.asarray(test.x[c]).reshape((-1,) + test.x.shape[3:])  # one shape for every client
    y = np.asarray(test.y[c]).reshape(-1)
    hit = np.argmax(np.asarray(predict(c, x)), axis=-1) == y
    correct.append(int(np.sum(hit & keep)))
    count.append(int(np.sum(keep)))
  return np.asarray(correct, np.float64), np.asarray(count, np.float64)


def summary(correct, count):
  acc = correct[count > 0] / count[count > 0]
  return {"accuracy_mean": acc.mean(), "accuracy_std": acc.std(),
          "accuracy_weighted": correct.sum() / count.sum(), "clients": float(len(acc))}


@pytest.mark.parametrize("epochs,part", [(0, "all"), (1, "all"), (1, "head")])
def test_fedbabu_evaluates_each_client_fine_tuned_on_its_own_split(epochs, part):
  algorithm = fedbabu(epochs, part)
  (_, s1), _, fns, spec, _ = run_rounds(algorithm, local=sgd_config(lr=0.1))
  train, test = uneven_clients(), uneven_clients(sizes=(9, 4, 11, 6, 3, 8))
  # Client 4's test split is empty (a small client can get none): it is left out.
  test = test._replace(mask=test.mask.at[4].set(False),
                       num_examples=test.num_examples.at[4].set(0))
  got = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=spec))(s1, train, test)
  base = jax.random.fold_in(jax.random.fold_in(s1.rng, s1.round), 0x5EED)
  lr = fns.local_lr(s1.round)

  def predict(c, x):
    params = s1.params
    if epochs:
      trainer = reference_trainer(jax.tree.map(lambda a: a[c], train),
                                  jax.random.fold_in(base, c), lr, fns, spec)
      params, _, _ = trainer.train(params, lambda p, b, k: loss_grad(p, b, fns.problem),
                                   epochs=epochs, stream=2,
                                   trainable=is_head if part == "head" else None)
      if part == "head":
        chex.assert_trees_all_equal(body(params), body(s1.params))
    return fns.problem.apply(params["model"], x)[0]

  want = summary(*per_client_accuracy(predict, test, NUM_CLIENTS))
  assert want["clients"] == NUM_CLIENTS - 1  # the empty test split is left out
  for k, v in want.items():
    assert math.isclose(float(got[k]), v, abs_tol=1e-6), (k, float(got[k]), v)


def test_personalized_eval_of_fedavg_is_the_global_model_on_each_clients_split(tmp_path):
  c = get_config("local")
  c.fl.algorithm = "fedavg"
  c.num_rounds = 1
  result = train_and_evaluate(c, str(tmp_path))
  record = result["history"][-1]
  _, test = result["experiment"].client_eval_data
  model = result["state"].params["model"]
  apply = jax.jit(result["experiment"].apply)
  correct, count = per_client_accuracy(lambda _, x: apply(model, x)[0], test, c.fl.num_clients)
  want = summary(correct, count)
  assert want["clients"] == c.fl.num_clients
  for k, v in want.items():
    assert math.isclose(record[f"personal/{k}"], v, abs_tol=1e-6), (k, record, v)
  # The global model's own test metrics are still there, next to the per-client ones.
  assert "test/accuracy" in record
  # Each client's own accuracy and example count are kept too, one line per evaluation.
  (clients,) = read_per_client(str(tmp_path))
  assert clients["round"] == 1 and clients["examples"] == [int(n) for n in count]
  np.testing.assert_allclose(clients["accuracy"], correct / count, atol=1e-6)


def test_personalized_preset_builds_in_the_paper_setting():
  c = get_config()
  assert (c.fl.num_clients, c.fl.clients_per_round, c.fl.local_epochs, c.num_rounds,
          c.dataset.batch_size) == (100, 10, 5, 300, 64)
  opt = c.client_optimizer
  assert (opt.learning_rate, opt.momentum, opt.weight_decay, opt.lr_decay) == (
      0.1, 0.9, 1e-4, 0.99)
  assert (c.fl.partition.dirichlet_alpha, get_config("dir01").fl.partition.dirichlet_alpha,
          get_config("lr005").client_optimizer.learning_rate) == (0.3, 0.1, 0.05)
  assert (c.fl.fedprox.mu, c.fl.moon.tau, c.fl.moon.mu, c.fl.fedrep.head_epochs,
          c.fl.fedbabu.finetune_epochs) == (0.5, 0.5, 1.0, 5, 5)
  assert c.fl.personalized_eval == "on" and c.model.name == "convnet3"
  for name in (*MINE, "fedavg", "fedprox", "moon"):
    c.fl.algorithm = name
    validate(c)
  with pytest.raises(ValueError, match="exclude each other"):
    get_config("dir03,dir01")


# Through train_and_evaluate on the preset: the algorithm that uploads nothing and the one
# with the most parts (fine-tuning before evaluation); every other one's round runs in
# test_algorithms.py, and its personalized evaluation below.
@pytest.mark.parametrize("name", ["local", "fedbabu"])
def test_personalized_preset_local_variant_runs_two_rounds(tmp_path, name):
  c = get_config("local,isr")
  c.fl.algorithm = name
  result = train_and_evaluate(c, str(tmp_path))
  history = result["history"]
  assert [r["round"] for r in history] == [1, 2]
  for r in history:
    assert math.isfinite(r["train/loss"]) and any(k.startswith("train/mi/") for k in r)
    assert r["personal/clients"] == c.fl.num_clients
    assert 0.0 <= r["personal/accuracy_mean"] <= 1.0
    assert (r["comm/up_bytes"] == 0.0) == (name == "local")


@pytest.mark.parametrize("name", ["fedper", "fedrep", "lg_fedavg", "fedbabu"])
def test_a_model_without_a_head_is_rejected_in_one_line(name):
  config = default_config()
  config.fl.algorithm = name
  params = {"model": {"fc": {"kernel": jnp.zeros((2, 2))}}, "adapters": {}}
  with pytest.raises(ConfigError, match=f"fl.algorithm='{name}' splits the model") as e:
    make_algorithm(config).init_server_state(params, None)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("setting,value,message", [
    ("fedrep.head_epochs", 0, "fl.fedrep.head_epochs=0 must be in"),
    ("fedbabu.finetune_epochs", -1, "fl.fedbabu.finetune_epochs=-1 must be in"),
    ("fedbabu.finetune_part", "body", "fl.fedbabu.finetune_part='body' is not one of"),
])
def test_bad_settings_name_the_setting(setting, value, message):
  config = default_config()
  config.fl.algorithm, key = setting.split(".")
  config.fl[config.fl.algorithm][key] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)
