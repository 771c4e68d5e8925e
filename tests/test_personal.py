"""Personal state and the personalized evaluation: the engine under every personalized method."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from support import digits, small_setup, uneven_clients

from isr_jax.data import pack_clients, split_clients
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.evaluate_clients import client_accuracy_stats, evaluate_clients
from isr_jax.fl.personal import is_head, merge, personal_predicate, select, travelling_bytes
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec
from isr_jax.optim import make_optimizer

LENET5_HEAD = 84 * 10 + 10  # LeNet-5's classifier on digits


def _leaf_paths(tree):
  return {tuple(getattr(k, "key", k) for k in p) for p, _ in
          jax.tree_util.tree_leaves_with_path(tree)}


def _params():
  state, _, _ = small_setup(isr=True)
  return state.params


def test_parts_split_the_model_at_its_head():
  params = _params()
  paths = _leaf_paths(params)
  head = {p for p in paths if p[:2] == ("model", "head")}
  adapters = {p for p in paths if p[0] == "adapters"}
  assert head and adapters
  assert {p for p in paths if is_head(tuple(jax.tree_util.DictKey(k) for k in p))} == head
  for part, aggregate, want in [
      ("", True, set()), ("head", True, head), ("body", True, paths - head - adapters),
      ("all", True, paths), ("", False, adapters), ("head", False, head | adapters)]:
    assert _leaf_paths(select(params, personal_predicate(part, aggregate))) == want, part
  with pytest.raises(ValueError, match="'neck'"):
    personal_predicate("neck")


def test_merge_puts_personal_leaves_back_and_nothing_else():
  params = _params()
  own = jax.tree.map(lambda a: a + 1.0, select(params, personal_predicate("head")))
  merged = merge(params, own)
  chex.assert_trees_all_equal(merged["model"]["head"], own["model"]["head"])
  chex.assert_trees_all_equal(merged["model"]["conv1"], params["model"]["conv1"])
  chex.assert_trees_all_equal(merged["adapters"], params["adapters"])
  chex.assert_trees_all_equal(merge(params, {}), params)


def test_messages_with_params_below_their_own_keys_count_only_shared_bytes():
  params = _params()
  message = {"delta": params, "delta_c": params, "tau": jnp.zeros((), jnp.float32)}
  total = sum(x.size * 4 for x in jax.tree.leaves(params))
  assert travelling_bytes(message, personal_predicate("")) == 2 * total + 4
  assert travelling_bytes(message, personal_predicate("head")) == 2 * (total - 4 * LENET5_HEAD) + 4


def test_split_clients_is_a_stratified_seeded_partition_of_each_client():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=400)
  clients = [np.sort(rng.choice(400, size=n, replace=False)) for n in (1, 2, 7, 40)]
  train, test = split_clients(clients, labels, 0.25, seed=3)
  for c, tr, te in zip(clients, train, test, strict=True):
    assert np.array_equal(np.sort(np.concatenate([tr, te])), c)
    assert len(te) == int(np.floor(len(c) * 0.25 + 0.5))
  # Stratified: each class of the large client keeps its share up to one example.
  big, held = clients[3], test[3]
  for k in range(5):
    n_k = np.sum(labels[big] == k)
    assert abs(np.sum(labels[held] == k) - 0.25 * n_k) <= 1.0
  again, _ = split_clients(clients, labels, 0.25, seed=3)
  assert all(np.array_equal(a, b) for a, b in zip(train, again, strict=True))
  other, _ = split_clients(clients, labels, 0.25, seed=4)
  assert not np.array_equal(train[3], other[3])


def test_head_personal_first_round_is_fedavg_on_the_body_and_keeps_the_head_home():
  # Round 1: every client's own head is still the global one, so each client trains exactly
  # as under FedAvg. The body then aggregates as FedAvg's; the global head never moves; the
  # sampled clients keep their trained heads, the others their old ones; only the body travels.
  data = uneven_clients()
  spec = FLSpec(clients_per_round=3, local_epochs=1)
  plain_state, plain_fns, _ = small_setup(isr=True, data=data)
  head_alg = fedavg()._replace(personal="head")
  state, fns, _ = small_setup(isr=True, data=data, algorithm=head_alg)
  run = lambda f: jax.jit(functools.partial(fl_round, fns=f, spec=spec))
  plain, _ = run(plain_fns)(plain_state, data)
  new, m = run(fns)(state, data)
  body = lambda p: {k: v for k, v in p["model"].items() if k != "head"}
  chex.assert_trees_all_close(body(new.params), body(plain.params), atol=1e-6)
  chex.assert_trees_all_close(new.params["adapters"], plain.params["adapters"], atol=1e-6)
  chex.assert_trees_all_equal(new.params["model"]["head"], state.params["model"]["head"])
  sampled = set(np.asarray(sample_clients(round_keys(state)[0], 6, 3)).tolist())
  heads = new.client_states["personal"]["model"]["head"]["kernel"]
  start = state.client_states["personal"]["model"]["head"]["kernel"]
  for c in range(6):
    assert (not np.array_equal(heads[c], start[c])) == (c in sampled)
  shared = sum(x.size * 4 for x in jax.tree.leaves(state.params)) - 4 * LENET5_HEAD
  assert float(m["comm/up_bytes"]) == float(m["comm/down_bytes"]) == 3 * shared


def test_trainer_freezes_what_is_not_trainable_even_with_momentum_and_weight_decay():
  def body_only(start, ctx, trainer):
    params, aux, n = trainer.train(start, lambda p, b, k: fns.algorithm.client_grad(
        p, ctx, b, trainer.problem, k), trainable=lambda path: not is_head(path))
    return params, ctx, aux, n

  local = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9,
                                         weight_decay=0.1))
  state, fns, _ = small_setup(isr=False, algorithm=fedavg()._replace(local_update=body_only),
                              local=local)
  fns = fns._replace(local_optimizer=make_optimizer(local))
  new, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=3)))(
      state, uneven_clients())
  chex.assert_trees_all_equal(new.params["model"]["head"], state.params["model"]["head"])
  assert not np.array_equal(new.params["model"]["conv1"]["kernel"],
                            state.params["model"]["conv1"]["kernel"])


def test_trainer_freezes_per_client_with_a_traced_flag():
  """``trainable`` may return a traced boolean (a per-client decision inside the round,
  as FedAIMS's sampled block): under vmap each client freezes its own leaves, bit for
  bit, with momentum and weight decay on; a non-scalar flag is refused."""
  big = 20  # the clients with more examples train their head, the others only the body

  def head_if_big(start, ctx, trainer):
    trains_head = trainer.data.num_examples > big
    params, aux, n = trainer.train(
        start, lambda p, b, k: fns.algorithm.client_grad(p, ctx, b, trainer.problem, k),
        trainable=lambda path: trains_head if is_head(path) else True)
    return params, ctx, aux, n

  local = ml_collections.ConfigDict(dict(name="sgd", learning_rate=0.1, momentum=0.9,
                                         weight_decay=0.1))
  fedper = fedavg()._replace(name="fedper", personal="head", local_update=head_if_big)
  data = uneven_clients()
  state, fns, _ = small_setup(isr=False, algorithm=fedper, local=local, data=data)
  new, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=4)))(
      state, data)
  sampled = np.asarray(sample_clients(round_keys(state)[0], 6, 4)).tolist()
  sizes = np.asarray(data.num_examples)
  assert {bool(sizes[c] > big) for c in sampled} == {False, True}  # both kinds sampled
  heads = lambda s: s.client_states["personal"]["model"]["head"]
  for c in sampled:
    before, after = (jax.tree.map(lambda a, c=c: a[c], heads(s)) for s in (state, new))
    if sizes[c] > big:
      assert not np.array_equal(before["kernel"], after["kernel"]), c
    else:
      chex.assert_trees_all_equal(before, after)
  assert not np.array_equal(new.params["model"]["conv1"]["kernel"],
                            state.params["model"]["conv1"]["kernel"])

  def vector_flag(start, ctx, trainer):
    flags = jnp.ones((2,), bool)
    trainer.train(start, lambda p, b, k: ({}, {}), trainable=lambda path: flags)
    return start, ctx, {}, 0

  bad = fedavg()._replace(local_update=vector_flag)
  state, fns, _ = small_setup(isr=False, algorithm=bad, data=data)
  with pytest.raises(ValueError, match=r"trainable\(.*boolean scalar"):
    jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=2)))(
        state, data)


def test_personalized_evaluation_of_the_global_model_counts_each_clients_own_hits():
  train, _, _ = digits()
  parts = [np.arange(i * 30, i * 30 + n) for i, n in enumerate((12, 30, 5, 0 + 1))]
  own_train, own_test = split_clients(parts, train.y, 0.25, seed=0)
  pack = lambda idx, b: jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, idx, b,
                                                              allow_empty=True))
  data_train, data_test = pack(own_train, 4), pack(own_test, 3)
  state, fns, _ = small_setup(isr=True, data=data_train)
  got = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=FLSpec(clients_per_round=2)))(
      state, data_train, data_test)
  correct, count = [], []
  for idx in own_test:
    logits = (fns.problem.apply(state.params["model"], jnp.asarray(train.x[idx]))[0]
              if len(idx) else np.zeros((0, 10)))
    correct.append(float(np.sum(np.argmax(logits, -1) == train.y[idx])))
    count.append(float(len(idx)))
  want = client_accuracy_stats(jnp.asarray(correct), jnp.asarray(count))
  assert float(got["clients"]) == sum(c > 0 for c in count) == 3  # the 1-example client has none
  for k in ("accuracy_mean", "accuracy_std", "accuracy_weighted"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6)
  acc = [c / n for c, n in zip(correct, count, strict=True) if n]
  np.testing.assert_allclose(float(got["accuracy_mean"]), np.mean(acc), rtol=1e-6)
  np.testing.assert_allclose(float(got["accuracy_std"]), np.std(acc), rtol=1e-5, atol=1e-7)


def test_personalized_evaluation_uses_each_clients_own_leaves():
  data = uneven_clients()
  state, fns, _ = small_setup(isr=False, data=data, algorithm=fedavg()._replace(personal="head"))
  # Client 0's head predicts class 0 for every input; the others keep the global head.
  heads = state.client_states["personal"]["model"]["head"]
  bias = heads["bias"].at[0].set(jnp.zeros(10).at[0].set(1e6))
  state = state._replace(client_states={**state.client_states, "personal": {
      "model": {"head": {**heads, "bias": bias}}}})
  got = jax.jit(functools.partial(evaluate_clients, fns=fns, spec=FLSpec(clients_per_round=2)))(
      state, data, data)
  y0 = np.asarray(data.y[0])[np.asarray(data.mask[0])]
  logits = [fns.problem.apply(merge(state.params, {"model": {"head": jax.tree.map(
      lambda a, c=c: a[c], state.client_states["personal"]["model"]["head"])}})["model"],
      np.asarray(data.x[c])[np.asarray(data.mask[c])])[0] for c in range(6)]
  hits = [np.sum(np.argmax(lg, -1) == np.asarray(data.y[c])[np.asarray(data.mask[c])])
          for c, lg in enumerate(logits)]
  assert hits[0] == np.sum(y0 == 0)
  n = np.asarray(data.num_examples, np.float64)
  np.testing.assert_allclose(float(got["accuracy_weighted"]), np.sum(hits) / n.sum(), rtol=1e-6)
