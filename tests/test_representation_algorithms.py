"""MOON, FedNTD, BalanceFL and FedGau: identities with FedAvg, hand-computed steps,
per-client state, NaN-freedom and hyper-parameter validation."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from support import assert_trees_close, digits, small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.data import pack_clients
from isr_jax.data.packing import ClientData
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, LocalProblem, ServerBroadcast
from isr_jax.fl.algorithms.balancefl import balancefl, feature_noise
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedgau import aggregation_weights, fedgau
from isr_jax.fl.algorithms.fedntd import fedntd, ntd_loss
from isr_jax.fl.algorithms.moon import moon, moon_proximal_loss
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec
from isr_jax.losses import cross_entropy
from isr_jax.models import create_model
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.taps import make_isr_spec

LN2, LN3 = math.log(2.0), math.log(3.0)
SIZES = (7, 12, 9, 10, 6, 8)
SPEC = FLSpec(clients_per_round=3, local_epochs=1)


def run_rounds(algorithm, data, rounds=2):
  state, fns, _ = small_setup(isr=False, algorithm=algorithm, data=data, model="convnet3")
  engine = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))
  states = [state]
  for _ in range(rounds):
    states.append(engine(states[-1], data)[0])
  return states


@functools.cache
def uneven():
  return uneven_clients(SIZES)


@functools.cache
def balanced_clients(num_clients=3, per_class=2):
  """Clients holding ``per_class`` examples of every digit: nothing to balance or inherit."""
  train, _, _ = digits()
  by_class = [np.flatnonzero(train.y == c) for c in range(10)]
  parts = [np.concatenate([idx[i * per_class:(i + 1) * per_class] for idx in by_class])
           for i in range(num_clients)]
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, batch_size=8))


# Each reduces to FedAvg: μ = 0 (no contrastive term), β = 0 (no distillation),
# and BalanceFL balancing by weights on clients holding every class equally often
# (P = all classes, M = ∅, w = 1, augmentation probability 0; its class-balanced
# draws are random, so they are checked by their distribution below). FedGau's γ = 0 is FedAvg by
# construction (S_n = |D_n| without a D_B in sight), so it is no test; FedGau's
# weights are checked against an independent computation below.
REDUCTIONS = {
    "fedavg": (fedavg, "uneven"),
    "moon": (lambda: moon(mu=0.0), "uneven"),
    "fedntd": (lambda: fedntd(beta=0.0), "uneven"),
    "fedavg_balanced": (fedavg, "balanced"),
    "balancefl": (lambda: balancefl(lam=1.0, temperature=2.0, resample=False), "balanced"),
}


@functools.cache
def two_rounds(name):
  make, data = REDUCTIONS[name]
  return run_rounds(make(), uneven() if data == "uneven" else balanced_clients())


@pytest.mark.parametrize("name", ["moon", "fedntd", "balancefl"])
def test_reduces_to_fedavg(name):
  reference = "fedavg" if REDUCTIONS[name][1] == "uneven" else "fedavg_balanced"
  assert_trees_close(two_rounds(name)[-1].params, two_rounds(reference)[-1].params,
                     atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- MOON


def xw_problem(num_extra_logits=0):
  """``z = x ⊙ w`` (2 parameters) as features and logits, plus constant 0 logits."""

  def apply(model, x):
    z = x * model["w"]
    logits = jnp.concatenate([z, jnp.zeros((z.shape[0], num_extra_logits))], axis=-1)
    return logits, {"features": z}

  def objective(logits, taps, adapters, batch):
    ce = cross_entropy(logits, batch.y, mask=batch.mask, weight=batch.weight)
    return ce, {"ce": ce, "total": ce}

  return LocalProblem(apply=apply, objective=objective)


def w_params(w):
  return {"model": {"w": jnp.asarray(w, jnp.float32)}, "adapters": {}}


def broadcast_of(params, alg_state=None):
  return ServerBroadcast(params, alg_state or {}, jnp.int32(0), jnp.float32(0.1))


def jitted_grad(alg, problem):
  return jax.jit(lambda p, ctx, b: alg.client_grad(p, ctx, b, problem, jax.random.PRNGKey(0)))


ONE_EXAMPLE = Batch(jnp.array([[1.0, 1.0]]), jnp.array([0]), jnp.array([True]))


def test_moon_hand_computed_step():
  # z = w = [1, 0], z_glob = [1, 1], z_prev = [0, 1], y = 0, τ = 0.5, μ = 1:
  # sim_g = 1/√2, sim_p = 0, ℓ_con = log(1 + e^{−√2}) = 0.2176217;
  # ∂ℓ/∂z = (1/τ) p_prev (∇sim_p − ∇sim_g), p_prev = 1/(1 + e^{√2}) = 0.1955703,
  # ∇sim_p = [0, 1], ∇sim_g = [0, 1/√2] ⇒ [0, 0.1145624];
  # CE: p = softmax([1, 0]) ⇒ ∇ = [p0 − 1, 1 − p0] = [−0.2689414, 0.2689414], CE = 0.3132617.
  alg = moon(mu=1.0, tau=0.5)
  broadcast = broadcast_of(w_params([1.0, 1.0]))
  ctx = alg.client_init(broadcast, {"prev": {"w": jnp.array([0.0, 1.0])}}, None)
  params = w_params([1.0, 0.0])
  grads, aux = jitted_grad(alg, xw_problem())(params, ctx, ONE_EXAMPLE)
  np.testing.assert_allclose(grads["model"]["w"], [-0.2689414, 0.3835039], atol=1e-6)
  np.testing.assert_allclose(aux["con"], 0.2176217, atol=1e-6)
  np.testing.assert_allclose(aux["total"], 0.5308834, atol=1e-6)
  # The proximal loss is μ ℓ_con on the same inputs (FedSoL's loss A).
  prox = moon_proximal_loss(2.0, 0.5)(params, broadcast.params, ctx, ONE_EXAMPLE, xw_problem(),
                                      None)
  np.testing.assert_allclose(prox, 2 * 0.2176217, atol=1e-6)
  # Only the delta travels; the local model becomes the next z_prev model.
  message, state = alg.client_final(broadcast, ctx, params, jnp.int32(1), {"prev": None})
  assert set(message) == {"delta"}
  np.testing.assert_allclose(message["delta"]["model"]["w"], [0.0, -1.0])
  np.testing.assert_allclose(state["prev"]["w"], [1.0, 0.0])


def test_moon_previous_model_scattered_only_for_sampled_clients():
  states = two_rounds("moon")
  for before, after in zip(states[:-1], states[1:], strict=True):
    sampled = set(np.asarray(sample_clients(round_keys(before)[0], len(SIZES), 3)).tolist())
    for c in range(len(SIZES)):
      row = lambda s, c=c: jax.tree.map(lambda a: a[c], s.client_states["alg"]["prev"])
      same = jax.tree.leaves(jax.tree.map(jnp.array_equal, row(before), row(after)))
      assert all(same) == (c not in sampled), c
  # Never-sampled clients still hold the initial global model.
  never = set(range(len(SIZES))) - {
      int(c) for s in states[:-1] for c in sample_clients(round_keys(s)[0], len(SIZES), 3)}
  for c in never:
    row = jax.tree.map(lambda a, c=c: a[c], states[-1].client_states["alg"]["prev"])
    assert_trees_close(row, states[0].params["model"], atol=0, rtol=0)


def test_moon_drives_fedsol():
  c = default_config()
  c.fl.algorithm, c.fl.fedsol.proximal, c.fl.moon.mu = "fedsol", "moon", 1.0
  alg = make_algorithm(c)
  state = alg.init_client_state(w_params([0.0, 1.0]), None)
  ctx = alg.client_init(broadcast_of(w_params([1.0, 1.0])), state, None)
  grads, aux = alg.client_grad(w_params([1.0, 0.0]), ctx, ONE_EXAMPLE, xw_problem(),
                               jax.random.PRNGKey(0))
  chex.assert_tree_all_finite((grads, aux))
  assert set(ctx["base"]) == {"global", "prev"}


def test_moon_contrasts_the_projection_head_of_a_real_model_with_isr():
  # LeNet-5 with MOON's projection head (output 16) and ISR on conv1 and conv2: the
  # model's last tap is the projection, so ℓ_con is Eq. 3 on it — recomputed here in
  # float64 NumPy from the three models' projections — while the ISR terms sit on
  # the encoder's taps. Jitted, on a real digits batch.
  train, _, info = digits()
  net = create_model("lenet5", num_classes=10, input_shape=info.input_shape,
                     rngs=nnx.Rngs(0), projection_dim=16)
  spec = make_isr_spec(net.tap_names, enabled=True, num_taps=2, spacing=2, mi_weight=0.5,
                       ne_weight=0.05)
  graphdef, model_params = split_model(net)
  start = init_params(graphdef, model_params, spec, num_classes=10,
                      input_shape=info.input_shape, key=jax.random.PRNGKey(1))
  problem = make_problem(graphdef, spec, representation=net.tap_names[-1])
  assert problem.representation == "projection" and spec.tap_names == ("conv1", "conv2")

  def moved(params, seed, scale):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(tree, [a + scale * jax.random.normal(k, a.shape)
                                     for a, k in zip(leaves, keys, strict=True)])

  glob, prev, local = start, moved(start, 2, 0.2), moved(start, 3, 0.1)
  batch = Batch(jnp.asarray(train.x[:8]), jnp.asarray(train.y[:8]),
                jnp.array([True] * 7 + [False]))
  key = jax.random.PRNGKey(0)
  step = jax.jit(lambda mu, p: moon(mu=mu, tau=0.5).client_grad(
      p, {"global": glob, "prev": prev["model"]}, batch, problem, key), static_argnums=0)
  grads, aux = step(1.0, local)

  def projection(params):
    return np.asarray(problem.apply(params["model"], batch.x)[1]["projection"], np.float64)

  def cosine(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

  z = projection(local)
  pos, neg = cosine(z, projection(glob)) / 0.5, cosine(z, projection(prev)) / 0.5
  want = np.mean((np.logaddexp(pos, neg) - pos)[:7])  # the padding example is left out
  np.testing.assert_allclose(aux["con"], want, rtol=1e-5)
  assert {"ce", "mi/conv1", "mi/conv2", "ne/conv1", "ne/conv2"} <= set(aux)
  # ∇(L_T + μ ℓ_con) is affine in μ, and the contrastive part reaches the projection
  # head and the encoder but not the output layer or the ISR adapters.
  g0, _ = step(0.0, local)
  g2, _ = step(2.0, local)
  con_grad = jax.tree.map(lambda a, b: a - b, grads, g0)
  assert_trees_close(jax.tree.map(lambda a, b: a - b, g2, grads), con_grad, atol=1e-5,
                     rtol=1e-4)
  norm = lambda t: float(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(t)))
  assert norm(con_grad["model"]["projection"]) > 0 and norm(con_grad["model"]["conv1"]) > 0
  assert norm(con_grad["model"]["head"]) == 0 and norm(con_grad["adapters"]) == 0


# ---------------------------------------------------------------- FedNTD


def test_fedntd_hand_computed_step():
  # z = [w0, w1, 0] = [0, ln 3, 0], z_g = 0, y = 0, τ = 1, β = 0.5:
  # CE: p = [1, 3, 1]/5 ⇒ CE = ln 5, ∇_w = [p0 − 1, p1] = [−0.8, 0.6];
  # not-true classes {1, 2}: q_l = [3/4, 1/4], q_g = [1/2, 1/2],
  # L_NTD = ½ ln(4/3) = 0.1438410, ∂/∂z_1 = q_l,1 − q_g,1 = 1/4 ⇒ ∇_w1 += β/4.
  alg = fedntd(beta=0.5, tau=1.0)
  ctx = alg.client_init(broadcast_of(w_params([0.0, 0.0])), {}, None)
  grads, aux = jitted_grad(alg, xw_problem(1))(w_params([0.0, LN3]), ctx, ONE_EXAMPLE)
  np.testing.assert_allclose(grads["model"]["w"], [-0.8, 0.725], atol=1e-6)
  np.testing.assert_allclose(aux["ntd"], 0.1438410, atol=1e-6)
  np.testing.assert_allclose(aux["total"], math.log(5) + 0.5 * 0.1438410, atol=1e-6)
  # τ = 2: q_l = softmax([ln 3, 0]/2) = [√3, 1]/(√3 + 1) ⇒ KL(q_g ‖ q_l) = 0.0372523.
  z_l = jnp.array([[0.0, LN3, 0.0]])
  value = ntd_loss(z_l, jnp.zeros_like(z_l), jnp.array([0]), tau=2.0, mask=jnp.array([True]))
  np.testing.assert_allclose(value, 0.0372523, atol=1e-6)


def test_fedntd_single_class_batch_and_equal_logits_are_nan_free():
  alg = fedntd(beta=1.0, tau=3.0)
  ctx = alg.client_init(broadcast_of(w_params([2.0, -1.0])), {}, None)
  batch = Batch(jnp.array([[1.0, 2.0], [3.0, -1.0], [0.0, 0.0]]), jnp.array([1, 1, 1]),
                jnp.array([True, True, False]))
  step = jax.jit(lambda p: alg.client_grad(p, ctx, batch, xw_problem(1), None))
  for w in ([2.0, -1.0], [50.0, -80.0]):  # local = global, and saturated logits
    chex.assert_tree_all_finite(step(w_params(w)))


def test_fedntd_dense_logits_per_pixel_with_ignore_label():
  key_l, key_g, key_y = jax.random.split(jax.random.PRNGKey(1), 3)
  z_l = jax.random.normal(key_l, (2, 3, 3, 4)) * 3
  z_g = jax.random.normal(key_g, (2, 3, 3, 4))
  y = np.array(jax.random.randint(key_y, (2, 3, 3), 0, 4))
  y[0, 0, :] = 255
  loss = jax.jit(lambda z, z_g, y, mask: ntd_loss(z, z_g, y, tau=1.0, mask=mask))
  mask = jnp.array([True, True])
  dense = loss(z_l, z_g, y, mask)
  keep = y.reshape(-1) != 255
  flat = lambda z: z.reshape(-1, 4)[keep]
  per_pixel = loss(flat(z_l), flat(z_g), y.reshape(-1)[keep], jnp.ones(keep.sum(), bool))
  np.testing.assert_allclose(dense, per_pixel, rtol=1e-6)
  grads = jax.jit(jax.grad(loss))(z_l, z_g, y, mask)
  chex.assert_tree_all_finite(grads)
  np.testing.assert_array_equal(np.asarray(grads)[0, 0], 0.0)  # ignored pixels


# ---------------------------------------------------------------- BalanceFL


def head_problem():
  """logits = f W with features f = x ``[B, 1]`` and a linear head ``W [1, 4]``."""

  def apply(model, x):
    return x @ model["head"]["kernel"], {"features": x}

  def objective(logits, taps, adapters, batch):
    ce = cross_entropy(logits, batch.y, mask=batch.mask, weight=batch.weight)
    return ce, {"ce": ce, "total": ce}

  return LocalProblem(apply=apply, objective=objective)


def head_params(w):
  return {"model": {"head": {"kernel": jnp.asarray([w], jnp.float32)}}, "adapters": {}}


def one_client(x, y):
  x, y = jnp.asarray(x, jnp.float32)[None, :, None], jnp.asarray(y)[None]
  return ClientData(x, y, jnp.ones(y.shape, bool), jnp.int32(y.size))


def test_balancefl_hand_computed_step():
  # Client labels [0, 0, 1] of 4 classes: P = {0, 1}, M = {2, 3}, n = [2, 1, 0, 0],
  # w_c = |D|/(|P| n_c) = [3/4, 3/2], aug. prob 1 − n_c/max = [0, 1/2].
  # W = [ln 2, 0, 2 ln 3, 0], W_g = 0, f = 1, λ = 1, T = 2.
  # CE over P: p = [2/3, 1/3]; ∂/∂z_P = [−1/3, 1/3] (y=0), [2/3, −2/3] (y=1);
  #   weighted mean (2·¾·[−⅓, ⅓] + 3/2·[⅔, −⅔])/3 = [1/6, −1/6];
  #   CE = (2·¾·ln 1.5 + 3/2·ln 3)/3 = 0.7520387.
  # KD over M at T = 2: q_l = softmax([ln 3, 0]) = [¾, ¼], q_g = [½, ½]:
  #   KL = ½ ln(4/3) = 0.1438410, ∂/∂z_M = (q_l − q_g)/T = [1/8, −1/8], weights average 1.
  alg = balancefl(lam=1.0, temperature=2.0, resample=False, feature_aug=False)
  data = one_client([1.0, 1.0, 1.0], [0, 0, 1])
  ctx = alg.client_init(broadcast_of(head_params([0.0] * 4)), {}, data)
  np.testing.assert_array_equal(ctx["present"], [True, True, False, False])
  np.testing.assert_allclose(ctx["class_weight"], [0.75, 1.5, 0.0, 0.0])
  np.testing.assert_allclose(ctx["aug_prob"], [0.0, 0.5, 0.0, 0.0])
  batch = Batch(data.x[0], data.y[0], data.mask[0])
  grads, aux = jitted_grad(alg, head_problem())(head_params([LN2, 0.0, 2 * LN3, 0.0]), ctx,
                                                batch)
  np.testing.assert_allclose(grads["model"]["head"]["kernel"][0],
                             [1 / 6, -1 / 6, 0.125, -0.125], atol=1e-6)
  np.testing.assert_allclose(aux["ce"], 0.7520387, atol=1e-6)
  np.testing.assert_allclose(aux["kd"], 0.1438410, atol=1e-6)
  np.testing.assert_allclose(aux["total"], 0.8958797, atol=1e-6)


def id_problem():
  """:func:`head_problem` whose aux also counts the examples of the batch by id (x = id)."""
  base = head_problem()

  def objective(logits, taps, adapters, batch):
    value, aux = base.objective(logits, taps, adapters, batch)
    ids = jax.nn.one_hot(batch.x[:, 0].astype(jnp.int32), 8) * batch.mask[:, None]
    return value, {**aux, "ids": jnp.sum(ids, axis=0)}

  return base._replace(objective=objective)


def test_balancefl_draws_class_balanced_batches():
  # Client: examples with ids 0..4 and labels [0, 0, 0, 1, 2], then a padding slot
  # (id 5). P = {0, 1, 2}, n = [3, 1, 1]: a draw picks each present class with
  # probability 1/3 and an example uniformly within it — 1/9 for ids 0-2, 1/3 for
  # ids 3 and 4, never the padding slot. The scheduled batch has 3 real slots of 4.
  ids = jnp.arange(6.0)
  data = ClientData(ids[None, :, None], jnp.array([[0, 0, 0, 1, 2, 0]]),
                    jnp.array([[True] * 5 + [False]]), jnp.int32(5))
  alg = balancefl(lam=1.0, temperature=2.0, feature_aug=False)
  ctx = alg.client_init(broadcast_of(head_params([0.0] * 4)), {}, data)
  batch = Batch(data.x[0, :4], data.y[0, :4], jnp.array([True, True, True, False]))
  params = head_params([0.3, -0.2, 0.1, 0.4])
  step = jax.jit(lambda k: alg.client_grad(params, ctx, batch, id_problem(), k))
  keys = jax.random.split(jax.random.PRNGKey(5), 3000)
  counts = np.asarray(jax.jit(jax.vmap(lambda k: step(k)[1]["ids"]))(keys))
  np.testing.assert_array_equal(counts.sum(axis=1), 3)  # the schedule's real slots
  np.testing.assert_allclose(counts.sum(axis=0)[:6] / counts.sum(),
                             [1 / 9, 1 / 9, 1 / 9, 1 / 3, 1 / 3, 0.0], atol=0.015)
  # A step is the plain, unweighted step on the drawn examples (the loss is a mean
  # over slots, so the multiset of drawn ids determines it).
  grads, aux = step(keys[0])
  drawn = np.repeat(np.arange(8), np.asarray(aux["ids"]).astype(int))
  plain = balancefl(lam=1.0, temperature=2.0, balanced=False, feature_aug=False)
  plain_ctx = plain.client_init(broadcast_of(head_params([0.0] * 4)), {}, data)
  drawn_batch = Batch(data.x[0, drawn], data.y[0, drawn], jnp.ones(3, bool))
  want, want_aux = plain.client_grad(params, plain_ctx, drawn_batch, id_problem(), None)
  assert_trees_close(grads, want, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(aux["total"], want_aux["total"], rtol=1e-6)


def test_balancefl_feature_noise_has_the_pooled_class_covariance():
  f = jax.random.normal(jax.random.PRNGKey(2), (6, 3)) * jnp.array([1.0, 2.0, 0.5])
  labels = jnp.array([0, 0, 0, 1, 1, 2])
  valid = jnp.array([True, True, True, True, True, False])
  keys = jax.random.split(jax.random.PRNGKey(3), 20000)
  noise = jax.jit(jax.vmap(lambda k: feature_noise(k, f, labels, valid, 3)))(keys)
  empirical = np.einsum("nbi,nbj->ij", noise, noise) / (noise.shape[0] * noise.shape[1])
  fn = np.asarray(f)
  want = (3 * np.cov(fn[:3].T) + 2 * np.cov(fn[3:5].T)) / 5  # Σ_c (n_c/N) Cov_c
  np.testing.assert_allclose(empirical, want, atol=0.05 * np.abs(want).max())


def test_balancefl_augments_only_rarer_classes():
  alg = balancefl(lam=0.0, temperature=2.0, balanced=False)
  plain = balancefl(lam=0.0, temperature=2.0, balanced=False, feature_aug=False)
  data = one_client([1.0, 3.0, 2.0], [0, 0, 1])  # class 1: probability 1/2
  ctx = alg.client_init(broadcast_of(head_params([0.0] * 4)), {}, data)
  params = head_params([0.3, -0.2, 0.1, 0.4])
  keys = jax.random.split(jax.random.PRNGKey(4), 16)

  def totals(a, n):
    batch = Batch(data.x[0, :n], data.y[0, :n], data.mask[0, :n])
    one = lambda k: a.client_grad(params, ctx, batch, head_problem(), k)[1]["total"]
    return np.asarray(jax.jit(jax.vmap(one))(keys))

  np.testing.assert_array_equal(totals(alg, 2), totals(plain, 2))  # class 0 only: never
  changed = totals(alg, 3) != totals(plain, 3)
  assert changed.any() and not changed.all()


def dense_head_problem():
  """Per-pixel ``logits = x·W`` with a 1x1-conv head ``W [1, 1, 1, 4]``; CE with ignore
  label 255; no ``features`` tap (as the segmentation models); the weights in ``aux``."""

  def apply(model, x):
    return x * model["head"]["kernel"].reshape(-1), {"decoder": x}

  def objective(logits, taps, adapters, batch):
    ce = cross_entropy(logits, batch.y, mask=batch.mask, ignore_index=255, weight=batch.weight)
    return ce, {"ce": ce, "total": ce, "weight": batch.weight}

  return LocalProblem(apply=apply, objective=objective)


def test_balancefl_dense_labels_per_pixel_by_hand():
  # One client, 2x2 label maps a = [[0, 0], [3, 255]], b = [[0, 0], [255, 3]] and a
  # padding image of 1s. Valid pixels n = [4, 0, 0, 2]: P = {0, 3}, M = {1, 2}, |D| = 6,
  # w_c = |D|/(|P| n_c) = [3/4, 0, 0, 3/2], aug. prob [0, 0, 0, 1/2].
  # x = 1 at valid pixels, 5 at ignored ones; W = [ln 2, 0, 2 ln 3, 0], W_g = 0, T = 2.
  # CE over P per pixel: p = [2/3, 1/3] (classes 0, 3); ∂/∂z_P = [−1/3, 1/3] (y=0),
  #   [2/3, −2/3] (y=3); Σ w ∂ / 6 = (4·¾·[−⅓, ⅓] + 2·3/2·[⅔, −⅔])/6 = [1/6, −1/6];
  #   CE = (3 ln 1.5 + 3 ln 3)/6 = 0.7520387.
  # KD over M = {1, 2} per valid pixel: q_l = softmax([0, ln 3]) = [¼, ¾], q_g = [½, ½]:
  #   KL = ½ ln(4/3) = 0.1438410 (mean over the 6 valid pixels, Σw = 6; over all 8
  #   non-padding pixels it would be 0.1078808), ∂/∂z_M = (q_l − q_g)/T = [−1/8, 1/8].
  a, b, pad = [[0, 0], [3, 255]], [[0, 0], [255, 3]], [[1, 1], [1, 1]]
  y = jnp.array([[a, b, pad]], jnp.int32)
  x = jnp.where(y == 255, 5.0, 1.0)[..., None]
  data = ClientData(x, y, jnp.array([[True, True, False]]), jnp.int32(2))
  params = {"model": {"head": {"kernel": jnp.array([LN2, 0.0, 2 * LN3, 0.0]).reshape(
      1, 1, 1, 4)}}, "adapters": {}}
  alg = balancefl(lam=1.0, temperature=2.0)  # feature_aug=True: off for dense labels
  ctx = alg.client_init(broadcast_of({"model": {"head": {"kernel": jnp.zeros((1, 1, 1, 4))}},
                                      "adapters": {}}), {}, data)
  np.testing.assert_array_equal(ctx["present"], [True, False, False, True])
  np.testing.assert_allclose(ctx["class_weight"], [0.75, 0.0, 0.0, 1.5])
  np.testing.assert_allclose(ctx["aug_prob"], [0.0, 0.0, 0.0, 0.5])
  batch = Batch(data.x[0], data.y[0], data.mask[0])
  grads, aux = jitted_grad(alg, dense_head_problem())(params, ctx, batch)
  np.testing.assert_allclose(grads["model"]["head"]["kernel"].reshape(-1),
                             [1 / 6, -0.125, 0.125, -1 / 6], atol=1e-6)
  np.testing.assert_allclose(
      aux["weight"], [[[0.75, 0.75], [1.5, 0.0]], [[0.75, 0.75], [0.0, 1.5]], [[0.0] * 2] * 2])
  np.testing.assert_allclose(aux["ce"], 0.7520387, atol=1e-6)
  np.testing.assert_allclose(aux["kd"], 0.1438410, atol=1e-6)
  np.testing.assert_allclose(aux["total"], 0.8958797, atol=1e-6)
  # The feature augmentation is off for dense labels: the same step as feature_aug=False.
  plain = balancefl(lam=1.0, temperature=2.0, feature_aug=False)
  want = jitted_grad(plain, dense_head_problem())(params, ctx, batch)
  assert_trees_close((grads, aux), want, atol=0, rtol=0)


# ---------------------------------------------------------------- FedGau


def test_fedgau_gaussians_scores_and_server_step():
  # Images of 2 pixels, 1 channel: a = [0, 2] (m = 1, v = 1), b = [2, 4] (m = 3, v = 1).
  # Client 0 holds {a, b}, client 1 holds {a} and a padding slot.
  # Global Gaussian of the images a, b, a: μ = 5/3, σ² = (2 + 10 + 2)/3 − μ² = 17/9.
  # D_B(N(m, v), N(μ, σ²)) = (m − μ)²/(4(v + σ²)) + ½ ln((v + σ²)/(2√(v σ²))):
  # D_B(a) = 0.0633267, D_B(b) = 0.1787114 ⇒ S_0 = e^{−0.0633267} + e^{−0.1787114}
  # = 1.7749840, S_1 = 0.9386367; with γ = 2: S_0 = e^{−0.1266534} + e^{−0.3574228}
  # = 1.5805157, S_1 = 0.8810390.
  a, b = [[0.0], [2.0]], [[2.0], [4.0]]
  x = jnp.array([[[a, b]], [[a, [[0.0], [0.0]]]]])
  mask = jnp.array([[[True, True]], [[True, False]]])
  data = ClientData(x, jnp.zeros(mask.shape, jnp.int32), mask, jnp.array([2, 1]))
  alg = fedgau(gamma=1.0)
  g = alg.init_server_state(None, data)
  np.testing.assert_allclose(g["mean"], [5 / 3], rtol=1e-6)
  np.testing.assert_allclose(g["var"], [17 / 9], rtol=1e-5)
  broadcast = broadcast_of(w_params([0.0, 0.0]), g)
  client = lambda c: jax.tree.map(lambda t: t[c], data)
  for gamma, want in ((1.0, [1.7749840, 0.9386367]), (2.0, [1.5805157, 0.8810390])):
    init = jax.jit(fedgau(gamma=gamma).client_init)
    scores = [init(broadcast, {}, client(c))["score"] for c in range(2)]
    np.testing.assert_allclose(scores, want, atol=1e-5)
  message, _ = alg.client_final(broadcast, {"score": jnp.float32(1.7749840)},
                                w_params([1.0, 0.0]), jnp.int32(1), {})
  assert set(message) == {"delta", "score"}
  # Server: w = S / ΣS over the real clients = [0.6541017, 0.3458983]; the padding
  # row (round weight 0) stays out whatever its score and delta.
  messages = {"delta": w_params([[1.0, 0.0], [0.0, 1.0], [7.0, 7.0]]),
              "score": jnp.array([1.7749840, 0.9386367, 5.0])}
  pseudo_grad, _ = alg.server_update(None, g, messages, jnp.array([0.6, 0.4, 0.0]))
  np.testing.assert_allclose(pseudo_grad["model"]["w"], [-0.6541017, -0.3458983], atol=1e-6)


def numpy_fedgau_scores(data: ClientData, gamma: float) -> np.ndarray:
  """``S_n`` of every client, from the real images' pixels, in float64 NumPy.

  Written from the module docstring's formulas, independently of fedgau.py:
  per-image Gaussians, their moment-matched global Gaussian, the
  Bhattacharyya distance of diagonal Gaussians (with the same +1e-6 on variances).
  """
  x = np.asarray(data.x, np.float64)  # [C, S, B, H, W, ch]
  mask = np.asarray(data.mask).reshape(x.shape[0], -1)
  pixels = x.reshape(*mask.shape, -1, x.shape[-1])  # [C, S·B, H·W, ch]
  m, v = pixels.mean(axis=2), pixels.var(axis=2)  # [C, S·B, ch]
  real_m, real_v = m[mask], v[mask]
  mu = real_m.mean(axis=0)
  var = (real_v + real_m ** 2).mean(axis=0) - mu ** 2
  v1, v2 = v + 1e-6, var + 1e-6
  distance = np.sum((m - mu) ** 2 / (4 * (v1 + v2))
                    + 0.5 * np.log((v1 + v2) / (2 * np.sqrt(v1 * v2))), axis=-1)
  return np.sum(np.where(mask, np.exp(-gamma * distance), 0.0), axis=1)


def test_fedgau_round_weights_match_an_independent_computation():
  # One jitted round on digits (ConvNet-3, uneven clients, 3 of 6 sampled): the
  # scores the clients upload and the server's weights S_n / ΣS equal the NumPy
  # computation for the sampled clients. Digits images all have nearly the same
  # pixel statistics (there S_n / ΣS is within 2e-4 of |D_n| / Σ|D|), so each
  # client's images are scaled by its own brightness factor to make the weights
  # differ from FedAvg's.
  data = uneven()
  brightness = jnp.linspace(0.4, 1.6, len(SIZES)).reshape(-1, 1, 1, 1, 1, 1)
  data = data._replace(x=data.x * brightness)
  alg = fedgau(gamma=1.0)

  def server_update(params, alg_state, messages, weights):
    pseudo_grad, state = alg.server_update(params, alg_state, messages, weights)
    return pseudo_grad, {**state, "score": messages["score"], "round_weights": weights,
                         "weights": aggregation_weights(messages["score"], weights)}

  probe = alg._replace(server_update=server_update)
  state, fns, _ = small_setup(isr=False, algorithm=probe, data=data, model="convnet3")
  new_state, _ = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))(state, data)
  sampled = np.asarray(sample_clients(round_keys(state)[0], len(SIZES), SPEC.clients_per_round))
  want = numpy_fedgau_scores(data, 1.0)[sampled]
  got = new_state.alg_state
  np.testing.assert_allclose(got["score"], want, rtol=1e-4)
  np.testing.assert_allclose(got["weights"], want / want.sum(), rtol=1e-4)
  sizes = np.asarray(SIZES, np.float64)[sampled]
  np.testing.assert_allclose(got["round_weights"], sizes / sizes.sum(), rtol=1e-6)
  assert np.abs(np.asarray(got["weights"]) - sizes / sizes.sum()).max() > 0.02
  # The global Gaussian is that of every client's real pixels.
  x = np.asarray(data.x, np.float64)
  real = x.reshape(-1, *x.shape[3:])[np.asarray(data.mask).reshape(-1)]
  np.testing.assert_allclose(state.alg_state["mean"], real.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(state.alg_state["var"], real.var(axis=(0, 1, 2)), rtol=1e-4)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("algorithm,setting,value", [
    ("moon", "mu", -1.0), ("moon", "tau", 0.0),
    ("fedntd", "beta", -0.5), ("fedntd", "tau", 0.0),
    ("balancefl", "lam", -1.0), ("balancefl", "temperature", 0.0),
    ("fedgau", "gamma", -1.0),
])
def test_bad_hyper_parameter_is_a_one_line_config_error(algorithm, setting, value):
  c = default_config()
  c.fl.algorithm = algorithm
  c.fl[algorithm][setting] = value
  with pytest.raises(ConfigError) as err:
    validate(c)
  message = str(err.value)
  assert f"fl.{algorithm}.{setting}" in message and "\n" not in message


def test_bad_moon_setting_through_fedsol_names_the_setting():
  c = default_config()
  c.fl.algorithm, c.fl.fedsol.proximal, c.fl.moon.tau = "fedsol", "moon", -0.5
  with pytest.raises(ConfigError, match=r"fl\.moon\.tau"):
    validate(c)
