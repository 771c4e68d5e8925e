"""The jitted, vmapped FL round against a plain per-client Python loop (methods §2)."""

import functools
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import (
    UNEVEN_SIZES,
    assert_trees_close,
    plain_sgd_client,
    small_setup,
    uneven_clients,
)
from test_algorithms import LENET5_ADAPTERS, LENET5_DIGITS

from isr_jax.config import default_config
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.client import batch_schedule, run_local_steps
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients, size_balanced_order
from isr_jax.fl.spec import FLSpec


def reference_fedavg_round(state, data, fns, spec: FLSpec, lr):
  """FedAvg written out: sample, loop over clients, loop over steps, weighted mean.

  Returns the new params, the sampled clients and Lemma 2's client drift
  ``Σ_n w_n ‖θ_n − θ_t‖²`` over the model (not the adapters).
  """
  k_sample, k_clients, _ = round_keys(state)
  sampled = np.asarray(sample_clients(k_sample, data.num_clients, spec.clients_per_round))
  deltas, sizes = [], []
  for c in sampled:
    key = jax.random.fold_in(k_clients, int(c))
    idx, valid = batch_schedule(key, data.mask[c].reshape(-1), data.batch_size,
                                epochs=spec.local_epochs, steps=spec.local_steps)
    flat = lambda a, c=c: a[c].reshape((-1,) + a.shape[3:])
    local, _ = plain_sgd_client(state.params, fns.problem.loss, flat(data.x), flat(data.y),
                                np.asarray(idx), np.asarray(valid), lr)
    deltas.append(jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), local, state.params))
    sizes.append(int(data.num_examples[c]))
  w = np.asarray(sizes, np.float64) / sum(sizes)
  mean_delta = jax.tree.map(lambda *d: sum(wi * di for wi, di in zip(w, d, strict=True)), *deltas)
  drift = sum(wi * sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(d["model"]))
              for wi, d in zip(w, deltas, strict=True))
  return jax.tree.map(lambda p, d: np.asarray(p) + d, state.params, mean_delta), sampled, drift


@pytest.mark.parametrize("local_epochs,local_steps", [(2, 0), (1, 5)])
def test_vmapped_round_equals_per_client_loop(local_epochs, local_steps):
  data = uneven_clients()
  state, fns, _ = small_setup(isr=True)
  spec = FLSpec(clients_per_round=4, local_epochs=local_epochs, local_steps=local_steps)
  want, sampled, drift = reference_fedavg_round(state, data, fns, spec, lr=0.1)
  assert len(set(UNEVEN_SIZES[i] for i in sampled)) > 1  # uneven clients are in the round
  new_state, metrics = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
  assert_trees_close(new_state.params, want, atol=2e-5)
  assert int(new_state.round) == 1
  assert float(metrics["fl/client_drift"]) == pytest.approx(drift, rel=1e-4)
  # 4 clients, each the model and both adapters (float32) up and down.
  assert float(metrics["comm/up_bytes"]) == float(metrics["comm/down_bytes"]) == (
      4 * 4 * (LENET5_DIGITS + LENET5_ADAPTERS))
  assert 0 < float(metrics["train/loss"]) < 10


def test_client_parallelism_strategies_agree():
  data = uneven_clients()
  results = []
  for strategy, chunk in [("vmap", 0), ("sequential", 0), ("chunked", 2)]:  # 2 + 2 + 1
    state, fns, _ = small_setup(isr=True)
    spec = FLSpec(clients_per_round=5, local_epochs=1, parallelism=strategy, chunk_size=chunk)
    new_state, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
    results.append(new_state.params)
  for other in results[1:]:
    assert_trees_close(results[0], other, atol=2e-5)


def test_padded_steps_change_nothing():
  """An all-padding step leaves params AND optimizer state (e.g. Adam's count) unchanged."""
  state, fns, _ = small_setup(isr=True)
  data = uneven_clients()
  x = data.x[0].reshape((-1,) + data.x.shape[3:])
  y = data.y[0].reshape(-1)
  idx, valid = batch_schedule(jax.random.PRNGKey(0), data.mask[0].reshape(-1), data.batch_size,
                              epochs=1, steps=0)
  opt = optax.adam(1e-2)
  grad_fn = lambda p, b, k: (jax.grad(lambda q: fns.problem.loss(q, b)[0])(p), {})
  run = functools.partial(run_local_steps, grad_fn=grad_fn, optimizer=opt,
                          key=jax.random.PRNGKey(1))
  active = np.asarray(valid).any(axis=1)
  assert active.sum() < len(active)  # client 0 (7 examples) has padding steps
  p1, o1, _, n1 = run(state.params, opt.init(state.params), x, y, idx, valid)
  p2, o2, _, n2 = run(state.params, opt.init(state.params), x, y, idx[active], valid[active])
  chex.assert_trees_all_equal(p1, p2)
  chex.assert_trees_all_equal(o1, o2)
  assert int(n1) == int(n2) == int(active.sum())
  assert int(o1[0].count) == int(active.sum())


@pytest.mark.parametrize("num_real", [7, 0])  # a client with examples, an empty one
def test_masking_once_after_the_loop_equals_masking_every_step(num_real):
  """Steps mode: every step runs or none does, so ``all_or_none`` changes nothing."""
  state, fns, _ = small_setup(isr=True)
  data = uneven_clients()
  x = data.x[0].reshape((-1,) + data.x.shape[3:])
  y = data.y[0].reshape(-1)
  mask = jnp.arange(x.shape[0]) < num_real
  idx, valid = batch_schedule(jax.random.PRNGKey(0), mask, data.batch_size, epochs=1, steps=4)
  opt = optax.adam(1e-2)
  # A gradient that moves the parameters even on an all-padding batch (as
  # FedProx's or FedDyn's terms can), so only the mask keeps an empty client still.
  grad_fn = lambda p, b, k: (jax.tree.map(lambda a: jnp.ones_like(a) + jnp.sum(b.mask), p), {})
  run = functools.partial(run_local_steps, state.params, opt.init(state.params), x, y, idx,
                          valid, grad_fn=grad_fn, optimizer=opt, key=jax.random.PRNGKey(1))
  every_step, once = run(all_or_none=False), run(all_or_none=True)
  chex.assert_trees_all_equal(every_step, once)
  if num_real == 0:
    chex.assert_trees_all_equal(once[0], state.params)
    assert int(once[3]) == 0


def test_batch_schedule_covers_each_example_once_per_epoch():
  mask = jnp.arange(24) < 19  # 19 real examples in 24 slots, B = 8
  idx, valid = batch_schedule(jax.random.PRNGKey(3), mask, 8, epochs=2, steps=0)
  assert idx.shape == (6, 8)
  for epoch in range(2):
    seen = np.asarray(idx[3 * epoch: 3 * epoch + 3])[np.asarray(valid[3 * epoch: 3 * epoch + 3])]
    assert sorted(seen.tolist()) == list(range(19))
  idx, valid = batch_schedule(jax.random.PRNGKey(3), mask, 8, epochs=1, steps=5)
  assert idx.shape == (5, 8) and bool(valid.all())
  assert set(np.asarray(idx).ravel().tolist()) <= set(range(19))


def test_round_compiles_once_across_rounds_with_new_samples():
  data = uneven_clients()
  state, fns, _ = small_setup(isr=True)
  spec = FLSpec(clients_per_round=3, local_epochs=1)
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=spec), donate_argnums=0)
  samples = []
  for _ in range(3):
    k_sample, _, _ = round_keys(state)
    samples.append(tuple(np.asarray(sample_clients(k_sample, 6, 3)).tolist()))
    state, _ = step(state, data)
  assert len(set(samples)) > 1
  assert step._cache_size() == 1


def test_personal_adapters_stay_per_client():
  data = uneven_clients()
  state, fns, _ = small_setup(isr=True, aggregate_adapters=False)
  spec = FLSpec(clients_per_round=2, local_epochs=1, aggregate_adapters=False)
  k_sample, _, _ = round_keys(state)
  sampled = np.asarray(sample_clients(k_sample, 6, 2))
  new_state, m = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
  # Only the model travels: 2 clients × the model's float32s, up and down.
  assert float(m["comm/up_bytes"]) == float(m["comm/down_bytes"]) == 2 * 4 * LENET5_DIGITS
  # The global adapters do not move; the sampled clients' own adapters do.
  chex.assert_trees_all_equal(new_state.params["adapters"], state.params["adapters"])
  before = state.client_states["personal"]["adapters"]
  after = new_state.client_states["personal"]["adapters"]
  for c in range(6):
    changed = any(not np.array_equal(a[c], b[c])
                  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))
    assert changed == (c in sampled)
  # The model itself is still aggregated.
  assert not np.array_equal(jax.tree.leaves(new_state.params["model"])[0],
                            jax.tree.leaves(state.params["model"])[0])


def test_scaffold_with_personal_adapters_moves_and_corrects_only_the_model():
  # Personal adapters never travel: SCAFFOLD's uplink is Δy and Δc of the model (2× FedAvg's
  # model-only uplink), its downlink x and c of the model; the adapters get no control
  # variate (there is no global adapter to drift from), on the server or on any client.
  config = default_config()
  config.fl.algorithm, config.fl.num_clients, config.isr.aggregate_adapters = "scaffold", 6, False
  data = uneven_clients()
  state, fns, _ = small_setup(isr=True, algorithm=config,
                              aggregate_adapters=False)
  spec = FLSpec(clients_per_round=3, local_epochs=1, aggregate_adapters=False)
  new, m = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
  assert float(m["comm/up_bytes"]) == float(m["comm/down_bytes"]) == 3 * 2 * 4 * LENET5_DIGITS
  for tree in (new.alg_state["c"]["adapters"], new.client_states["alg"]["c"]["adapters"]):
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(tree))
  assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(new.alg_state["c"]["model"]))
  # The adapters still train, per client.
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(new.client_states["personal"]["adapters"]),
      jax.tree.leaves(state.client_states["personal"]["adapters"]), strict=True))


def test_size_balanced_order_deals_sorted_clients_to_devices_in_snake_order():
  sizes = jnp.array([5, 50, 20, 40, 10, 30, 0, 60])
  one_device = size_balanced_order(sizes, FLSpec(clients_per_round=8, parallelism="chunked"))
  assert np.asarray(one_device).tolist() == [7, 1, 3, 5, 2, 4, 0, 6]
  assert np.asarray(size_balanced_order(sizes, FLSpec(clients_per_round=8,
                                                      parallelism="sequential"))).tolist() == \
      list(range(8))
  # Two devices (only the mesh's size is read): sorted 7 1 3 5 2 4 0 6 dealt 0 1 1 0 0 1 1 0,
  # so each device's work is 110 vs 105 examples and its clients stay sorted.
  spec = FLSpec(clients_per_round=8, parallelism="sequential", mesh=SimpleNamespace(size=2))
  assert np.asarray(size_balanced_order(sizes, spec)).tolist() == [7, 5, 2, 6, 1, 3, 4, 0]


def test_size_balanced_chunks_leave_every_client_and_the_aggregate_unchanged():
  # Sorting clients into chunks of similar size only changes which lanes run together;
  # every client's result and the aggregation order are those of the sampling order.
  data = uneven_clients()
  state, fns, _ = small_setup(isr=True)
  run = lambda spec: jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
  seq, m_seq = run(FLSpec(clients_per_round=5, parallelism="sequential"))
  chunk, m_chunk = run(FLSpec(clients_per_round=5, parallelism="chunked", chunk_size=2))
  assert_trees_close(seq.params, chunk.params, atol=2e-5)
  assert_trees_close(seq.client_states, chunk.client_states, atol=2e-5)
  np.testing.assert_allclose(float(m_seq["fl/local_steps"]), float(m_chunk["fl/local_steps"]))


def test_plan_round_sees_every_sampled_client_and_gives_each_its_row():
  """``plan_round`` (FedAIMS's Algorithm 2 hook): one decision over the gathered
  states of ALL sampled clients, taken before any trains; client i gets row i as
  ``broadcast.plan``. Here the plan is (own id, how many times the sampled clients
  trained before, together), written back into the client state."""
  base = fedavg()

  def plan_round(alg_state, client_states, ids):
    del alg_state
    before = jnp.sum(client_states["seen"])
    return {"id": ids.astype(jnp.float32), "before": jnp.broadcast_to(before, ids.shape)}

  def client_final(broadcast, ctx, local, steps, cstate):
    message, _ = base.client_final(broadcast, ctx, local, steps, cstate)
    return message, {"seen": cstate["seen"] + 1, "got": broadcast.plan}

  alg = base._replace(
      name="planned", plan_round=plan_round, client_final=client_final,
      init_client_state=lambda p, d: {"seen": jnp.zeros(()),
                                      "got": {"id": -jnp.ones(()), "before": -jnp.ones(())}})
  data = uneven_clients()
  state, fns, _ = small_setup(isr=False, algorithm=alg, data=data)
  spec = FLSpec(clients_per_round=3, local_epochs=1, parallelism="vmap")
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))
  times = np.zeros(6, int)
  for _ in range(3):
    picked = np.asarray(sample_clients(round_keys(state)[0], 6, 3)).tolist()
    got_before = np.asarray(state.client_states["alg"]["got"]["id"])
    state, _ = step(state, data)
    got = state.client_states["alg"]["got"]
    for c in range(6):
      if c in picked:
        assert float(got["id"][c]) == c
        assert float(got["before"][c]) == times[picked].sum()
      else:
        assert float(got["id"][c]) == got_before[c]
    times[picked] += 1


def test_algorithms_without_a_plan_get_none():
  seen = []

  def client_init(broadcast, client_state, client_data):
    seen.append(broadcast.plan)
    return {}

  state, fns, _ = small_setup(isr=False, algorithm=fedavg()._replace(client_init=client_init))
  jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=2)))(
      state, uneven_clients())
  assert seen == [None]


@pytest.mark.parametrize(("name", "strategy", "chunk"), [
    ("fedavg", "sequential", 0), ("ditto", "vmap", 0)])  # chunks: the strategies' test
def test_messages_summed_as_clients_finish_equal_the_stacked_weighted_mean(name, strategy,
                                                                           chunk):
  """``mean_messages``: the round carries Σ n_i m_i instead of stacking every m_i.

  FedPer keeps a personal head (zeroed in the message), Ditto trains in its own
  ``local_update``; chunks of 2 over 5 clients leave a remainder chunk of 1.
  """
  algorithm = make_algorithm(_config(name))
  assert algorithm.mean_messages
  spec = FLSpec(clients_per_round=5, local_epochs=1, parallelism=strategy, chunk_size=chunk)
  data = uneven_clients()
  out = []
  for alg in (algorithm, algorithm._replace(mean_messages=False)):
    state, fns, _ = small_setup(isr=True, algorithm=alg, data=data)
    out.append(jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data))
  (summed, m1), (stacked, m2) = out
  assert_trees_close(summed, stacked, atol=1e-6)
  assert {k: float(v) for k, v in m1.items()} == pytest.approx(
      {k: float(v) for k, v in m2.items()}, rel=1e-5)


def _config(name):
  c = default_config()
  c.fl.algorithm = name
  c.fl.num_clients = 6
  return c


def test_every_mean_message_rule_reads_only_the_weighted_mean():
  """What ``mean_messages`` promises, for every algorithm that sets it.

  Its server rule given three clients' messages and weights must equal the rule
  given their weighted mean alone with weight 1 (random messages of the
  algorithm's own structure).
  """
  from isr_jax.fl.algorithm import ServerBroadcast
  from isr_jax.fl.registry import ALGORITHMS

  data = uneven_clients()
  state, fns, _ = small_setup(isr=True, data=data)
  flagged = [n for n in sorted(ALGORITHMS)
             if make_algorithm(_config(n), fns.problem).mean_messages]
  assert {"fedavg", "fedprox", "fedper", "ditto", "fedbabu", "moon"} <= set(flagged)
  assert not {"scaffold", "feddyn", "fednova", "fedaims", "fedgau"} & set(flagged)
  weights = jnp.asarray([0.5, 0.3, 0.2])
  for name in flagged:
    alg = make_algorithm(_config(name), fns.problem)
    params = state.params
    broadcast = ServerBroadcast(params, alg.init_server_state(params, data), state.round,
                                jnp.float32(0.1), None)
    row = jax.tree.map(lambda a: a[0], data)
    ctx = alg.client_init(broadcast, alg.init_client_state(params, row), row)
    messages = []
    for i in range(3):
      local = jax.tree.map(
          lambda p, i=i: p + jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
      messages.append(alg.client_final(broadcast, ctx, local, jnp.int32(4),
                                       alg.init_client_state(params, row))[0])
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *messages)
    mean = jax.tree.map(lambda m: jnp.tensordot(weights, m, axes=1)[None], stacked)
    want = alg.server_update(params, broadcast.alg_state, stacked, weights)
    got = alg.server_update(params, broadcast.alg_state, mean, jnp.ones((1,)))
    assert_trees_close(got, want, atol=1e-5)
