"""FedAIMS (FedAIMS paper §4, methods §4): Eq. 3 and Eq. 4 by hand, Algorithm 2 by
hand and against an independent float64 reference, the Eq. 12 objective against a
float64 NumPy reference on a real model, and the round on digits: round 0 has no
prototype term, μ = 0 with λ = 1 is FedPer, one intermediate block makes sampling
and Full the same, unsampled clients keep their personal state bit for bit, the
plan reaches the clients, bytes follow Table 6, and training lowers the loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import assert_trees_close, fedaims_with, small_setup, uneven_clients

from isr_jax.config import default_config
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, ServerBroadcast
from isr_jax.fl.algorithms.fedaims_parts import (
    aggregate_prototypes,
    class_sums,
    client_prototypes,
    cosine_matrix,
    flat_backbone,
    prototypes_from_sums,
    supervision_sampling,
    tap_layout,
)
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.personal import merge
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec
from isr_jax.models import create_model
from isr_jax.objective import make_apply, make_problem, split_model

SPEC3 = FLSpec(clients_per_round=3, local_epochs=1)


def rounds(state, fns, data, n, spec=SPEC3):
  step = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))
  out = []
  for _ in range(n):
    state, m = step(state, data)
    out.append((state, m))
  return out


def sampled_ids(state, spec=SPEC3, num_clients=6):
  return set(np.asarray(sample_clients(round_keys(state)[0], num_clients,
                                       spec.clients_per_round)).tolist())


# -- Eq. 3 and Eq. 4 --


def test_class_prototypes_by_hand_with_an_absent_class_and_padding():
  f = jnp.asarray([[1., 2.], [3., 4.], [5., 6.], [7., 8.], [100., 100.]])
  y = jnp.asarray([0, 1, 0, 3, 1])
  mask = jnp.asarray([True, True, True, True, False])  # the last one is padding
  sums, counts = class_sums(f, y, mask, 4)
  np.testing.assert_array_equal(counts, [2, 1, 0, 1])
  want = [[3., 4.], [3., 4.], [0., 0.], [7., 8.]]  # class 2 absent: zero prototype
  np.testing.assert_allclose(prototypes_from_sums(sums, counts), want)


def test_client_prototypes_pool_over_all_batches():
  class Data:  # two batches of two; block "features" = 2·x
    x = jnp.asarray([[[1., 0.], [2., 2.]], [[3., 4.], [9., 9.]]])
    y = jnp.asarray([[1, 0], [1, 0]])
    mask = jnp.asarray([[True, True], [True, False]])

  apply = lambda p, x: (None, {"features": p * x})
  proto, counts = client_prototypes(apply, 2.0, Data, "features", pool=False, num_classes=3)
  np.testing.assert_array_equal(counts, [1, 2, 0])
  np.testing.assert_allclose(proto, [[4., 4.], [4., 4.], [0., 0.]])


def test_global_prototypes_by_hand_both_modes():
  # 3 clients (+1 padding), K = 4, D = 1; class 3 on no client.
  protos = jnp.asarray([[[1.], [2.], [0.], [0.]],
                        [[3.], [0.], [5.], [0.]],
                        [[5.], [4.], [0.], [0.]],
                        [[9.], [9.], [9.], [0.]]])
  counts = jnp.asarray([[2, 1, 0, 0], [1, 0, 3, 0], [4, 2, 0, 0], [0, 0, 0, 0]])
  p = jnp.asarray([0.5, 0.3, 0.2, 0.0])
  present = aggregate_prototypes(protos, counts, p, "present")
  np.testing.assert_allclose(present[:, 0], [2.4, 1.8 / 0.7, 5.0, 0.0], rtol=1e-6)
  literal = aggregate_prototypes(protos, counts, p, "literal")
  np.testing.assert_allclose(literal[:, 0], [2.4, 1.8, 1.5, 0.0], rtol=1e-6)


# -- Algorithm 2 --


def test_supervision_sampling_by_hand():
  s = np.eye(5)
  for (i, j), v in {(0, 2): .9, (1, 2): .2, (0, 4): .1, (3, 4): .3, (1, 4): .5, (2, 4): .7,
                    (0, 1): .4, (0, 3): .6, (1, 3): .8, (2, 3): .05}.items():
    s[i, j] = s[j, i] = v
  # 0 → G0 (tie of empty groups); 1 → G1 (only smallest); 2: δ = (.9, .2) → G1;
  # 3 → G0 (only smallest); 4: δ = ((.1+.3)/2, (.5+.7)/2) → G0. Sizes (3, 2): G1 is
  # block 1, the larger G0 block 2.
  blocks = supervision_sampling(jnp.asarray(s, jnp.float32), jnp.ones(5, bool), 2)
  np.testing.assert_array_equal(blocks, [2, 1, 1, 2, 2])


def test_supervision_sampling_ties_go_to_the_lowest_group_and_padding_is_skipped():
  ones = jnp.ones((6, 6))
  real = jnp.asarray([True, True, True, False, True, True])
  # First round (all similarities 1): 0→G0, 1→G1, 2→G2, 3 padding, 4→G0 (tie),
  # 5→G1 (tie of G1, G2). Sizes (2, 2, 1): G2 → block 1, G0 → 2, G1 → 3 (stable).
  np.testing.assert_array_equal(supervision_sampling(ones, real, 3), [2, 3, 1, 0, 2, 3])


def reference_sampling(s: np.ndarray, num_groups: int) -> list[int]:
  """Algorithm 2 in float64 Python, written from the paper's text."""
  groups: list[list[int]] = [[] for _ in range(num_groups)]
  for i in range(len(s)):
    smallest = min(len(g) for g in groups)
    best = None
    for k, g in enumerate(groups):
      if len(g) != smallest:
        continue
      delta = sum(s[i][j] for j in g) / len(g) if g else 0.0
      if best is None or delta < best[0]:
        best = (delta, k)
    groups[best[1]].append(i)
  ranked = sorted(range(num_groups), key=lambda k: len(groups[k]))  # stable
  block = {}
  for r, k in enumerate(ranked):
    for i in groups[k]:
      block[i] = r + 1
  return [block[i] for i in range(len(s))]


@pytest.mark.parametrize("n,groups", [(5, 2), (10, 3), (7, 4), (2, 3)])
def test_supervision_sampling_matches_a_float64_reference(n, groups):
  rng = np.random.default_rng(n * 10 + groups)
  for _ in range(5):
    v = rng.normal(size=(n, 8))
    s = np.asarray(cosine_matrix(jnp.asarray(v, jnp.float32)), np.float64)
    got = np.asarray(supervision_sampling(jnp.asarray(s, jnp.float32), jnp.ones(n, bool), groups))
    assert got.tolist() == reference_sampling(s, groups)
    sizes = [int(np.sum(got == b)) for b in range(1, groups + 1)]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)  # balanced, deeper ≥


def test_cosine_matrix_in_float64():
  v = np.random.default_rng(0).normal(size=(4, 5))
  want = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
  np.testing.assert_allclose(cosine_matrix(jnp.asarray(v, jnp.float32)), want, atol=1e-6)


# -- blocks --


@pytest.mark.parametrize("name", ["lenet5", "convnet3", "fedavg_cnn"])
def test_blocks_follow_the_models_tap_order(name):
  net = create_model(name, num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, params = split_model(net)
  layout = tap_layout(make_apply(graphdef), params, jnp.zeros((1, 8, 8, 1)))
  assert tuple(layout) == tuple(net.tap_names)


def test_bad_settings_are_one_line_errors():
  c = default_config()
  c.fl.algorithm = "fedaims"
  for setting, value in [("mu", -1.0), ("lam", 1.5), ("reduction", "l1"), ("hidden", 0),
                         ("aggregation", "median"), ("prototype_at", "middle")]:
    bad = c.copy_and_resolve_references()
    bad.fl.fedaims[setting] = value
    with pytest.raises(ConfigError, match=f"fl.fedaims.{setting}"):
      make_algorithm(bad)
  for blocks, match in [(("nope", "features"), "not among"), (("block2", "block1", "features"),
                        "block order"), (("block1", "block2"), "head's input")]:
    alg = fedaims_with(blocks=blocks)
    with pytest.raises(ConfigError, match=f"fl.fedaims.blocks.*{match}"):
      small_setup(isr=False, algorithm=alg, model="convnet3")


# -- Eq. 12 on a real model against float64 NumPy --


def _np_ce(logits, y, valid):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -np.sum(logp[np.arange(len(y)), y] * valid) / max(valid.sum(), 1)


def _np_sigma(s, c):
  h = np.maximum(c @ s["hidden"]["kernel"] + s["hidden"]["bias"], 0)
  return h @ s["out"]["kernel"] + s["out"]["bias"]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mse"])
def test_objective_matches_a_float64_reference(full, reduction):
  mu = 0.7
  algorithm = fedaims_with(mu=mu, reduction=reduction, full=full)
  state, fns, _ = small_setup(isr=False, algorithm=algorithm, model="convnet3")
  alg = fns.algorithm
  data = uneven_clients()
  cstate = jax.tree.map(lambda a: a[1], state.client_states["alg"])
  rng = np.random.default_rng(0)
  protos = jnp.asarray(rng.normal(size=state.alg_state["prototype"].shape), jnp.float32)
  # Block weights: one-hot at block 2 (sampled) or none (Full: uniform).
  plan = None if full else jnp.asarray([0., 1., 0.])
  broadcast = ServerBroadcast(state.params, {"prototype": protos, "ready": jnp.asarray(True)},
                              jnp.int32(1), jnp.float32(0.1), plan)
  ctx = alg.client_init(broadcast, cstate, None)
  params = {**state.params, "fedaims": ctx["own"]}
  batch = Batch(data.x[1, 0], data.y[1, 0], data.mask[1, 0].at[-2:].set(False))
  _, aux = jax.jit(lambda p: alg.client_grad(p, ctx, batch, fns.problem, None))(params)

  f64 = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float64), t)
  logits, taps = f64(fns.problem.apply(params["model"], batch.x))
  own, c = f64(ctx["own"]), np.asarray(protos, np.float64)
  y, valid = np.asarray(batch.y), np.asarray(batch.mask, np.float64)
  names = ["block1", "block2", "block3", "features"]
  m, lam = len(names), 1 / len(names)

  def r(target, feat):
    feat = feat.reshape(len(y), -1)
    total = np.sum(np.sum((target[y] - feat) ** 2, -1) * valid)
    return total if reduction == "sum" else total / (valid.sum() * feat.shape[-1])

  main = _np_ce(logits, y, valid) + mu * r(c, taps["features"])
  weights = np.full(m - 1, 1 / (m - 1)) if full else np.asarray(plan)
  aux_terms = 0.0
  for j, name in enumerate(names[:-1]):
    pooled = taps[name].mean(axis=(1, 2))
    ce_j = _np_ce(pooled @ own["ce"][name]["kernel"] + own["ce"][name]["bias"], y, valid)
    aux_terms += weights[j] * (ce_j + mu * r(_np_sigma(own["sigma"][name], c), taps[name]))
  want = lam * main + (1 - lam) * aux_terms
  np.testing.assert_allclose(float(aux["total"]), want, rtol=2e-5)


# -- the round on digits --


def test_mu_zero_lambda_one_is_fedper():
  fedper = fedavg()._replace(name="fedper", personal="head")
  data = uneven_clients()
  a, fns_a, _ = small_setup(algorithm=fedaims_with(mu=0.0, lam=1.0), data=data, model="convnet3")
  b, fns_b, _ = small_setup(algorithm=fedper, data=data, model="convnet3")
  for (sa, ma), (sb, mb) in zip(rounds(a, fns_a, data, 2), rounds(b, fns_b, data, 2),
                                strict=True):
    assert_trees_close(sa.params, sb.params, atol=1e-6)
    assert_trees_close(sa.client_states["personal"], sb.client_states["personal"], atol=1e-6)
    np.testing.assert_allclose(ma["train/ce"], mb["train/ce"], rtol=1e-6)


def test_round_zero_has_no_prototype_term():
  data = uneven_clients()
  out = {}
  for mu in (0.0, 3.0):
    state, fns, _ = small_setup(algorithm=fedaims_with(mu=mu, reduction="mse"), data=data,
                                model="convnet3")
    assert not bool(state.alg_state["ready"])
    out[mu] = rounds(state, fns, data, 2)
  (a0, _), (b0, n0) = out[0.0][0], out[3.0][0]
  assert bool(a0.alg_state["ready"])
  assert float(n0["train/fedaims/reg_last"]) == 0.0 == float(n0["train/fedaims/aux_reg"])
  jax.tree.map(np.testing.assert_array_equal, (a0.params, a0.client_states),
               (b0.params, b0.client_states))
  np.testing.assert_array_equal(a0.alg_state["prototype"], b0.alg_state["prototype"])
  (a1, _), (b1, n1) = out[0.0][1], out[3.0][1]
  assert float(n1["train/fedaims/reg_last"]) > 0
  diff = jax.tree.map(lambda u, v: float(jnp.max(jnp.abs(u - v))), a1.params, b1.params)
  assert max(jax.tree.leaves(diff)) > 1e-4


def test_one_intermediate_block_makes_sampling_and_full_the_same():
  data = uneven_clients()
  blocks = ("block3", "features")
  a, fa, _ = small_setup(algorithm=fedaims_with(blocks=blocks, reduction="mean"), data=data,
                         model="convnet3")
  b, fb, _ = small_setup(algorithm=fedaims_with(blocks=blocks, reduction="mean", full=True),
                         data=data, model="convnet3")
  assert set(a.client_states["alg"]) == {"sigma", "ce", "backbone"}
  assert set(b.client_states["alg"]) == {"sigma", "ce"}
  for (sa, _), (sb, _) in zip(rounds(a, fa, data, 2), rounds(b, fb, data, 2), strict=True):
    assert_trees_close(sa.params, sb.params, atol=1e-6)
    assert_trees_close(sa.alg_state, sb.alg_state, atol=1e-6)
    own = lambda s: {k: s.client_states["alg"][k] for k in ("sigma", "ce")}
    assert_trees_close(own(sa), own(sb), atol=1e-6)
    assert_trees_close(sa.client_states["personal"], sb.client_states["personal"], atol=1e-6)


def test_personal_state_moves_only_for_sampled_clients_and_bytes_follow_table_6():
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3")
  (s1, _), (s2, m2) = rounds(state, fns, data, 2)
  # Round 1's sample and plan, as the round computes them.
  ids = sample_clients(round_keys(s1)[0], 6, 3)
  gathered = jax.tree.map(lambda a: a[ids], s1.client_states["alg"])
  plan = fns.algorithm.plan_round(s1.alg_state, gathered, ids)
  block = {int(c): int(jnp.argmax(plan[i])) for i, c in enumerate(ids)}
  names = ("block1", "block2", "block3")
  moved = lambda t, c: not bool(jnp.array_equal(t(s1)[c], t(s2)[c]))
  for c in range(6):
    alg_leaves = lambda s, c=c: jax.tree.map(lambda a: a[c], s.client_states)
    if c not in block:  # unsampled: everything bit-identical
      jax.tree.map(np.testing.assert_array_equal, alg_leaves(s1), alg_leaves(s2))
      continue
    assert moved(lambda s: s.client_states["personal"]["model"]["head"]["kernel"], c)
    assert moved(lambda s: s.client_states["alg"]["backbone"]["blocks"][0]["conv"]["kernel"], c)
    for j, name in enumerate(names):  # only the supervised block's σ and CE^j train
      sigma = lambda s, name=name: s.client_states["alg"]["sigma"][name]["out"]["kernel"]
      ce = lambda s, name=name: s.client_states["alg"]["ce"][name]["kernel"]
      assert moved(sigma, c) == moved(ce, c) == (j == block[c]), (c, name, block[c])
  # The global head never moves (it is personal).
  np.testing.assert_array_equal(s2.params["model"]["head"]["kernel"],
                                state.params["model"]["head"]["kernel"])
  # Up: backbone + ISR adapters + C_i^m [K, D_m] + K counts; down: the same less counts.
  count = lambda t: sum(x.size for x in jax.tree.leaves(t))
  head = count(state.params["model"]["head"])
  travels = count(state.params) - head
  k, d_m = 10, 64  # convnet3 on 8×8: features = 1·1·64
  assert float(m2["comm/up_bytes"]) == 3 * 4 * (travels + k * d_m + k)
  assert float(m2["comm/down_bytes"]) == 3 * 4 * (travels + k * d_m)


def test_the_plan_comes_from_the_clients_latest_backbones():
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3")
  alg = fns.algorithm
  ids = jnp.arange(6)
  # Round 0: every stored backbone is the initial one, all similarities 1.
  plan = alg.plan_round(state.alg_state, state.client_states["alg"], ids)
  np.testing.assert_array_equal(jnp.argmax(plan, 1) + 1, [1, 2, 3, 1, 2, 3])
  spec1 = FLSpec(clients_per_round=1, local_epochs=1)
  (s1, _), = rounds(state, fns, data, 1, spec=spec1)
  (c,) = sampled_ids(state, spec1)
  # One client: FedAvg of one is its local model, so its stored backbone is the new body.
  stored = jax.tree.map(lambda a: a[c], s1.client_states["alg"]["backbone"])
  body = {k: v for k, v in s1.params["model"].items() if k != "head"}
  assert_trees_close(stored, body, atol=1e-6)
  backbones = jax.vmap(flat_backbone)(s1.client_states["alg"]["backbone"])
  want = supervision_sampling(cosine_matrix(backbones), jnp.ones(6, bool), 3)
  got = alg.plan_round(s1.alg_state, s1.client_states["alg"], ids)
  np.testing.assert_array_equal(jnp.argmax(got, 1) + 1, want)
  np.testing.assert_array_equal(got.sum(1), 1.0)
  # Padding clients (id −1) get no block.
  pad = alg.plan_round(s1.alg_state, s1.client_states["alg"], jnp.asarray([0, 1, 2, 3, 4, -1]))
  np.testing.assert_array_equal(pad[-1], 0.0)


def test_prototypes_sent_up_are_eq3_of_the_received_backbone():
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3",
                              isr=False)
  spec1 = FLSpec(clients_per_round=1, local_epochs=1)
  (s1, _), = rounds(state, fns, data, 1, spec=spec1)
  (c,) = sampled_ids(state, spec1)
  # One client: C_g = its own C_i^m (Eq. 4 with one client), computed with θ_t (line 9).
  own = merge(state.params, jax.tree.map(lambda a: a[c], state.client_states["personal"]))
  feats = [fns.problem.apply(own["model"], data.x[c, s])[1]["features"]
           for s in range(data.x.shape[1])]
  f = np.concatenate([np.asarray(t, np.float64) for t in feats])
  y, mask = np.asarray(data.y[c]).reshape(-1), np.asarray(data.mask[c]).reshape(-1)
  want = np.stack([f[mask & (y == k)].mean(0) if np.any(mask & (y == k)) else np.zeros(64)
                   for k in range(10)])
  np.testing.assert_allclose(s1.alg_state["prototype"], want, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_clients_loss():
  """Ten rounds of FedAIMS on digits (ConvNet3, lr 0.1, reduction "mse": the printed
  "sum" of Eq. 5/8 diverges at this learning rate) lower the mean cross-entropy of
  the clients' personalized models on their own data, also after the prototype
  term switched on (round 1)."""
  data = uneven_clients()
  state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="convnet3",
                              isr=False)
  problem = fns.problem

  @jax.jit
  def client_ce(state):
    def one(cdata, personal):
      own = merge(state.params, personal)
      x = cdata.x.reshape((-1,) + cdata.x.shape[2:])
      logits = problem.apply(own["model"], x)[0]
      return problem.objective(logits, {}, {}, Batch(x, cdata.y.reshape(-1),
                                                     cdata.mask.reshape(-1)))[0]
    return jax.vmap(one)(data, state.client_states["personal"])

  out = rounds(state, fns, data, 10, spec=FLSpec(clients_per_round=3, local_epochs=2))
  start, first, last = (float(client_ce(s).mean()) for s in (state, out[1][0], out[-1][0]))
  assert all(np.isfinite(float(m["train/loss"])) for _, m in out)
  assert last < 0.9 * first < 0.9 * start, (start, first, last)


def test_registry_builds_fedaims_once_from_the_problem():
  c = default_config()
  c.fl.algorithm = "fedaims_full"
  with pytest.raises(ValueError, match="needs the run's problem"):
    make_algorithm(c)
  net = create_model("lenet5", num_classes=10, input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
  graphdef, _ = split_model(net)
  alg = make_algorithm(c, make_problem(graphdef, None))
  assert alg.personal == "head" and alg.plan_round is None and alg.name == "fedaims_full"


def test_resume_restores_personal_state_and_prototypes_exactly(tmp_path):
  import chex
  from test_train import tiny

  from isr_jax.train import train_and_evaluate

  settings = {"fl.algorithm": "fedaims", "fl.fedaims.reduction": "mse"}
  straight = train_and_evaluate(tiny("fl", num_rounds=3, **settings), str(tmp_path / "a"))
  train_and_evaluate(tiny("fl", num_rounds=2, **settings), str(tmp_path / "b"))
  resumed = train_and_evaluate(tiny("fl", num_rounds=3, **settings), str(tmp_path / "b"))
  chex.assert_trees_all_equal(straight["state"], resumed["state"])
  state = resumed["state"]
  assert bool(state.alg_state["ready"])
  assert set(state.client_states["alg"]) == {"sigma", "ce", "backbone"}
  assert "personal/accuracy_mean" in resumed["metrics"]


def test_vmap_and_sequential_clients_agree():
  data = uneven_clients()
  states = []
  for parallelism in ("vmap", "sequential"):
    state, fns, _ = small_setup(algorithm=fedaims_with(reduction="mse"), data=data, model="lenet5")
    spec = FLSpec(clients_per_round=3, local_epochs=1, parallelism=parallelism)
    states.append(rounds(state, fns, data, 2, spec=spec)[-1][0])
  assert_trees_close(states[0].params, states[1].params, atol=2e-5)
  assert_trees_close(states[0].client_states, states[1].client_states, atol=2e-5)
  assert_trees_close(states[0].alg_state, states[1].alg_state, atol=2e-5)
