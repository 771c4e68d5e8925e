"""FedProx, FedDyn, SCAFFOLD, FedNova, FedIR, FedAvgM and FedAdagrad/FedAdam/FedYogi
(methods §4): identities with FedAvg through the engine, hand-computed steps on a
2-parameter model, the state SCAFFOLD and FedDyn carry across a round, and their
config validation."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from support import assert_trees_close, digits, sgd_config, small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.data import pack_clients
from isr_jax.data.packing import ClientData
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, LocalProblem, ServerBroadcast
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedavgm import fedavgm
from isr_jax.fl.algorithms.feddyn import feddyn
from isr_jax.fl.algorithms.fedir import fedir
from isr_jax.fl.algorithms.fednova import fednova, step_weight_sum
from isr_jax.fl.algorithms.fedopt import adaptive_server_optimizer
from isr_jax.fl.algorithms.fedprox import fedprox
from isr_jax.fl.algorithms.scaffold import scaffold
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import fl_round, init_client_states
from isr_jax.fl.selection import round_keys, sample_clients
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.losses import cross_entropy
from isr_jax.optim import learning_rate_at, make_optimizer
from isr_jax.state import TrainState

# ---------------------------------------------------------------- helpers


def quadratic_problem():
  """``z = x·w``, ``L = ½ Σ_i ω_i m_i (z_i − y_i)² / Σ_i m_i``: ``∇L = Σ ω m r x / Σ m``."""

  def apply(model, x):
    z = x @ model["w"]
    return z, {"features": x}

  def objective(z, taps, adapters, batch):
    r = z - batch.y
    omega = jnp.ones_like(r) if batch.weight is None else batch.weight
    m = batch.mask.astype(r.dtype)
    loss = 0.5 * jnp.sum(omega * m * r * r) / jnp.maximum(jnp.sum(m), 1.0)
    return loss, {"total": loss, "ce": loss}

  return LocalProblem(apply=apply, objective=objective)


def two(w):
  return {"model": {"w": jnp.asarray(w, jnp.float32)}, "adapters": {}}


def model_w(tree):
  return np.asarray(tree["model"]["w"])


# Problem A: x = I, y = (0, 1). At w = (1, 2): r = (1, 1), ∇L = r ⊙ diag(x)/2 = (0.5, 0.5), L = 0.5.
BATCH_A = Batch(x=jnp.eye(2), y=jnp.array([0.0, 1.0]), mask=jnp.array([True, True]))


def broadcast(global_w, alg_state=None, lr=0.5):
  return ServerBroadcast(two(global_w), alg_state if alg_state is not None else {},
                         jnp.int32(0), jnp.float32(lr))


def stacked(*messages):
  return jax.tree.map(lambda *m: jnp.stack(m), *messages)


# ---------------------------------------------------------------- identities with FedAvg

# One engine spec (so one FedAvg compile) for every identity; the data sets below all
# have uneven_clients()'s shapes ([6, 6, 8, ...]), so they reuse the compiled round.
SPEC = FLSpec(clients_per_round=3, local_epochs=1)


def clients(name):
  """``uneven``: digits in clients of sizes 7..45 (1 to 6 local steps).
  ``equal_steps``: sizes 41..48, every client 6 local steps of batch 8.
  ``same_labels``: uneven sizes, client j holds k_j examples of each class 0..4, so
  every client's label distribution is the global one."""
  if name == "uneven":
    return uneven_clients()
  if name == "equal_steps":
    return uneven_clients(sizes=(41, 48, 44, 45, 42, 47))
  train, _, _ = digits()
  per_class = [np.flatnonzero(train.y == c) for c in range(5)]
  start, parts = 0, []
  for k in (1, 6, 4, 9, 2, 5):
    parts.append(np.concatenate([ix[start:start + k] for ix in per_class]))
    start += k
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, batch_size=8))


def small(algorithm, data):
  return small_setup(algorithm=algorithm, data=data, isr=False, model="fedavg_cnn")


def run(algorithm, data, rounds=2):
  """Params after each of ``rounds`` engine rounds."""
  state, fns, _ = small(algorithm, data)
  engine = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))
  out = []
  for _ in range(rounds):
    state, _ = engine(state, data)
    out.append(state.params)
  return out


@functools.cache
def fedavg_engine():
  state, fns, _ = small(fedavg(), clients("uneven"))
  return state, jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))


def fedavg_rounds(data):
  state, engine = fedavg_engine()
  out = []
  for _ in range(2):
    state, _ = engine(state, data)
    out.append(state.params)
  return out


def assert_rounds_equal(got, want, atol=1e-6):
  for g, w in zip(got, want, strict=True):
    assert_trees_close(g, w, atol=atol, rtol=1e-6)


@pytest.mark.parametrize("algorithm", [
    fedprox(mu=0.0),
    feddyn(alpha=0.0, num_clients=6),
    fedavgm(beta=0.0, server_lr=1.0),
], ids=lambda a: a.name)
def test_zero_hyper_parameter_is_fedavg(algorithm):
  data = clients("uneven")
  assert_rounds_equal(run(algorithm, data), fedavg_rounds(data))


def test_fednova_with_equal_local_steps_is_fedavg():
  data = clients("equal_steps")
  assert_rounds_equal(run(fednova(), data), fedavg_rounds(data))


def test_scaffold_with_zero_control_variates_is_fedavg_then_departs():
  # c = c_i = 0 during all of round 1, so round 1 is FedAvg's for any number of local
  # steps (one step included); in round 2 the control variates are live.
  data = clients("uneven")
  got, want = run(scaffold(num_clients=6), data), fedavg_rounds(data)
  assert_trees_close(got[0], want[0], atol=1e-6, rtol=1e-6)
  gap = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), got[1], want[1])
  assert max(jax.tree.leaves(gap)) > 1e-4


def test_fedir_with_identical_label_distributions_is_fedavg():
  data = clients("same_labels")
  assert_rounds_equal(run(fedir(), data), fedavg_rounds(data))


# ---------------------------------------------------------------- hand-computed steps


def local_fedprox(mu, lr, momentum=0.0, epochs=1):
  """FedProx's local update on problem A (one step of batch 2 per epoch) from w = (1, 2),
  anchored at w^t = (0.5, 1)."""
  alg = fedprox(mu=mu)
  one = jax.tree.map(lambda a: a[None], BATCH_A)  # one slot row: [S = 1, B = 2, ...]
  cdata = ClientData(one.x, one.y, one.mask, jnp.int32(2))
  optimizer = optax.inject_hyperparams(optax.sgd, static_args="momentum")(
      learning_rate=lr, momentum=momentum or None)
  fns = RoundFns(alg, quadratic_problem(), optimizer, lambda t: lr, optax.sgd(1.0))
  spec = FLSpec(clients_per_round=1, local_epochs=epochs)

  @jax.jit
  def local(start):
    trainer = make_trainer(cdata, jax.random.key(0), jnp.float32(lr), fns, spec)
    ctx = alg.client_init(broadcast([0.5, 1.0], lr=lr), {}, None)
    params, _, aux_sum, num_steps = alg.local_update(start, ctx, trainer)
    return params, aux_sum, num_steps

  params, aux_sum, num_steps = local(two([1.0, 2.0]))
  return model_w(params), aux_sum, int(num_steps)


def test_fedprox_local_step_by_hand():
  # Li et al. Eq. 2 by proximal SGD: the step on ∇F, then the proximal operator of
  # (μ/2)‖w − w_g‖² with step η. η = 0.5, μ = 0.1, w = (1, 2), w_g = (0.5, 1), ∇F = (0.5, 0.5):
  # w' = (0.75, 1.75); prox = (w' + 0.05·w_g)/1.05 = (0.775, 1.8)/1.05.
  w, aux, steps = local_fedprox(mu=0.1, lr=0.5)
  np.testing.assert_allclose(w, [0.775 / 1.05, 1.8 / 1.05], rtol=1e-6)
  # The reported term is at the step's start: 0.05·(0.25 + 1) = 0.0625, F = 0.5.
  np.testing.assert_allclose([aux["prox"], aux["total"], aux["ce"]], [0.0625, 0.5625, 0.5],
                             rtol=1e-6)
  assert steps == 1
  np.testing.assert_allclose(local_fedprox(mu=0.0, lr=0.5)[0], [0.75, 1.75], rtol=1e-6)
  # Server = FedAvg: Δ = (0.2, −0.4), (−0.6, 0.8) with weights (0.25, 0.75):
  # mean Δ = (−0.4, 0.5), pseudo-gradient = (0.4, −0.5).
  alg = fedprox(mu=0.1)
  msgs = stacked({"delta": two([0.2, -0.4])}, {"delta": two([-0.6, 0.8])})
  pseudo, _ = alg.server_update(two([0.0, 0.0]), {}, msgs, jnp.array([0.25, 0.75]))
  np.testing.assert_allclose(model_w(pseudo), [0.4, -0.5], rtol=1e-6)


def test_fedprox_stiff_term_under_momentum_stays_bounded():
  """ημ = 50 under heavy-ball momentum: the proximal step contracts toward the anchor,
  where the term's gradient fed through the momentum buffer diverged (ημ > 2(1 + β))."""
  w, aux, steps = local_fedprox(mu=100.0, lr=0.5, momentum=0.9, epochs=40)
  assert steps == 40 and np.isfinite(aux["total"])
  # Its fixed point: the momentum buffer holds ∇F/(1 − β), so μ(1 − β)(w_g − w) = ∇F(w)
  # = ((w₁ − 0)/2, (w₂ − 1)/2): w = (5/10.5, 1), reached within 0.9⁴⁰ ≈ 1.5 %.
  np.testing.assert_allclose(w, [5 / 10.5, 1.0], atol=1e-3)


def test_feddyn_client_and_server_step_by_hand():
  alg = feddyn(alpha=0.1, num_clients=4)
  # Acar et al. Alg. 1, local objective, with ∇L_i(θ_i^{t−1}) = (0.2, −0.3), θ = (1, 2),
  # θ^{t−1} = (0.5, 1):
  # ∇ = (0.5, 0.5) − (0.2, −0.3) + 0.1·(0.5, 1) = (0.35, 0.9);
  # extra terms = 0.05·1.25 − (0.2·1 − 0.3·2) = 0.0625 + 0.4 = 0.4625.
  client_state = {"prev_grad": two([0.2, -0.3])}
  b = broadcast([0.5, 1.0])
  ctx = alg.client_init(b, client_state, None)
  grads, aux = alg.client_grad(two([1.0, 2.0]), ctx, BATCH_A, quadratic_problem(), None)
  np.testing.assert_allclose(model_w(grads), [0.35, 0.9], rtol=1e-6)
  np.testing.assert_allclose([aux["prox"], aux["total"]], [0.4625, 0.9625], rtol=1e-6)
  # State update: (0.2, −0.3) − 0.1·((1, 2) − (0.5, 1)) = (0.15, −0.4).
  msg, new_state = alg.client_final(b, ctx, two([1.0, 2.0]), jnp.int32(3), client_state)
  np.testing.assert_allclose(model_w(msg["delta"]), [0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(model_w(new_state["prev_grad"]), [0.15, -0.4], rtol=1e-6)
  # Server step with Δ = (0.5, 1), (−0.2, 0.4) (weights 0.25, 0.75) and a padding row
  # (weight 0, must be ignored); h^{t−1} = (0.01, −0.02), N = 4:
  # h = (0.01, −0.02) − 0.025·(0.3, 1.4) = (0.0025, −0.055);
  # θ^t − θ^{t−1} = mean Δ − h/α = (−0.025, 0.55) − (0.025, −0.55) = (−0.05, 1.1).
  msgs = stacked({"delta": two([0.5, 1.0])}, {"delta": two([-0.2, 0.4])},
                 {"delta": two([9.0, 9.0])})
  pseudo, h = alg.server_update(two([0.5, 1.0]), {"h": two([0.01, -0.02])}, msgs,
                                jnp.array([0.25, 0.75, 0.0]))
  np.testing.assert_allclose(model_w(h["h"]), [0.0025, -0.055], rtol=1e-5)
  np.testing.assert_allclose(model_w(pseudo), [0.05, -1.1], rtol=1e-5)


def test_scaffold_client_and_server_step_by_hand():
  alg = scaffold(num_clients=4)
  # Karimireddy et al. Alg. 1, corrected step: g + c − c_i = (0.5, 0.5) + (0.1, −0.2) − (0.3, 0.1)
  # = (0.3, 0.2).
  server_state = {"c": two([0.1, -0.2])}
  client_state = {"c": two([0.3, 0.1])}
  b = broadcast([0.5, 1.0], server_state, lr=0.5)
  ctx = alg.client_init(b, client_state, None)
  grads, _ = alg.client_grad(two([1.0, 2.0]), ctx, BATCH_A, quadratic_problem(), None)
  np.testing.assert_allclose(model_w(grads), [0.3, 0.2], rtol=1e-6)
  # Option II, K = 2, η_l = 0.5, x = (0.5, 1), y = (1, 2):
  # c_i⁺ = (0.3, 0.1) − (0.1, −0.2) + (−0.5, −1)/1 = (−0.3, −0.7); Δc = (−0.6, −0.8).
  msg, new_state = alg.client_final(b, ctx, two([1.0, 2.0]), jnp.int32(2), client_state)
  np.testing.assert_allclose(model_w(new_state["c"]), [-0.3, -0.7], rtol=1e-6)
  np.testing.assert_allclose(model_w(msg["delta_c"]), [-0.6, -0.8], rtol=1e-6)
  np.testing.assert_allclose(model_w(msg["delta"]), [0.5, 1.0], rtol=1e-6)
  # A client that took no step keeps c_i (no division by K = 0).
  msg0, same = alg.client_final(b, ctx, two([0.5, 1.0]), jnp.int32(0), client_state)
  np.testing.assert_allclose(model_w(same["c"]), [0.3, 0.1])
  np.testing.assert_allclose(model_w(msg0["delta_c"]), [0.0, 0.0])
  # Server step, N = 4: Δc = (−0.6, −0.8), (0.2, 0.4), padding row (weight 0):
  # c = (0.1, −0.2) + (−0.4, −0.4)/4 = (0, −0.3); pseudo = −(0.25·(0.5, 1) + 0.75·(−0.2, 0.4))
  # = (0.025, −0.55).
  msgs = stacked(msg, {"delta": two([-0.2, 0.4]), "delta_c": two([0.2, 0.4])},
                 {"delta": two([9.0, 9.0]), "delta_c": two([9.0, 9.0])})
  pseudo, new_server = alg.server_update(two([0.5, 1.0]), server_state, msgs,
                                         jnp.array([0.25, 0.75, 0.0]))
  np.testing.assert_allclose(model_w(new_server["c"]), [0.0, -0.3], atol=1e-7)
  np.testing.assert_allclose(model_w(pseudo), [0.025, -0.55], rtol=1e-6)
  down = alg.downlink(b)
  assert set(down) == {"params", "c"}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("correction", ["full", "scaled"])
def test_scaffold_option_two_is_the_mean_gradient_under_momentum(nesterov, correction):
  # K optax SGD-momentum steps on a constant corrected gradient g + w(c − c_i), w = 1
  # ("full") or 1 − β ("scaled"): c_i⁺ must give back g exactly in both.
  beta, lr, k = 0.9, 0.05, 5
  w = 1.0 if correction == "full" else 1 - beta
  g, c, c_i = np.array([0.4, -1.2]), np.array([0.1, -0.2]), np.array([0.3, 0.1])
  opt = optax.sgd(lr, momentum=beta, nesterov=nesterov)
  y = two([0.5, 1.0])
  opt_state = opt.init(y)
  for _ in range(k):
    updates, opt_state = opt.update(two(g + w * (c - c_i)), opt_state, y)
    y = optax.apply_updates(y, updates)
  alg = scaffold(num_clients=4, momentum=beta, nesterov=nesterov, momentum_correction=correction)
  b = broadcast([0.5, 1.0], {"c": two(c)}, lr=lr)
  grads, _ = alg.client_grad(two([1.0, 2.0]), {"correction": two(c - c_i)}, BATCH_A,
                             quadratic_problem(), None)
  np.testing.assert_allclose(model_w(grads), 0.5 + w * (c - c_i), rtol=1e-6)  # ∇L_A = 0.5
  b = broadcast([0.5, 1.0], {"c": two(c)}, lr=lr)
  _, new_state = alg.client_final(b, None, y, jnp.int32(k), {"c": two(c_i)})
  np.testing.assert_allclose(model_w(new_state["c"]), g, rtol=1e-5)
  with pytest.raises(ValueError, match="momentum=1.0"):
    scaffold(num_clients=4, momentum=1.0)
  with pytest.raises(ValueError, match="momentum_correction='half'"):
    scaffold(num_clients=4, momentum_correction="half")


def test_scaffold_option_two_with_weight_decay_is_the_mean_regularised_gradient():
  # Our SGD adds λθ to the gradient before momentum, so K steps on a constant corrected
  # gradient g̃ = g + c − c_i move x − y = η Σ_j a_j (g̃ + λ y_j), a_j = (1 − β^{K−j})/(1 − β),
  # and option II gives c_i⁺ = g + λ Σ_j a_j y_j / ‖a‖₁: the a-weighted mean gradient of
  # L_i + (λ/2)‖θ‖², the objective the clients descend.
  beta, lr, wd, k = 0.9, 0.05, 0.1, 5
  g, c, c_i = np.array([0.4, -1.2]), np.array([0.1, -0.2]), np.array([0.3, 0.1])
  opt = make_optimizer(ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=lr, momentum=beta, nesterov=False, weight_decay=wd)))
  y = two([0.5, 1.0])
  opt_state, ys = opt.init(y), []
  for _ in range(k):
    ys.append(model_w(y))
    updates, opt_state = opt.update(two(g + c - c_i), opt_state, y)
    y = optax.apply_updates(y, updates)
  a = (1 - beta ** (k - np.arange(k))) / (1 - beta)
  want = g + wd * (a[:, None] * np.asarray(ys)).sum(axis=0) / a.sum()
  alg = scaffold(num_clients=4, momentum=beta, momentum_correction="full")
  b = broadcast([0.5, 1.0], {"c": two(c)}, lr=lr)
  _, new_state = alg.client_final(b, None, y, jnp.int32(k), {"c": two(c_i)})
  np.testing.assert_allclose(model_w(new_state["c"]), want, rtol=1e-5)


def test_fednova_step_weights_by_hand_and_against_optax():
  # Wang et al., local momentum ρ = 0.5: a(τ=3) = (3 − 0.5·(1 − 0.125)/0.5)/0.5 = 4.25,
  # a(τ=1) = 1; Nesterov: τ + ρ·a = 3 + 2.125 = 5.125; plain SGD: a = τ.
  np.testing.assert_allclose(step_weight_sum(jnp.int32(3), 0.5), 4.25, rtol=1e-6)
  np.testing.assert_allclose(step_weight_sum(jnp.int32(1), 0.5), 1.0, rtol=1e-6)
  np.testing.assert_allclose(step_weight_sum(jnp.int32(3), 0.5, nesterov=True), 5.125,
                             rtol=1e-6)
  assert float(step_weight_sum(jnp.int32(7))) == 7.0
  # ‖a‖₁ is the displacement of τ optax steps under a constant gradient, in units of η g.
  for nesterov in (False, True):
    opt = optax.sgd(0.1, momentum=0.5, nesterov=nesterov)
    w, state = jnp.zeros(()), opt.init(jnp.zeros(()))
    for _ in range(5):
      u, state = opt.update(jnp.ones(()), state)
      w = w + u
    np.testing.assert_allclose(-w / 0.1, step_weight_sum(jnp.int32(5), 0.5, nesterov),
                               rtol=1e-5)


def test_fednova_client_and_server_step_by_hand():
  alg = fednova(momentum=0.5)
  b = broadcast([1.0, 1.0])
  # τ = 3: a = 4.25, θ_t − θ_i = (4.25, −4.25) → d = (1, −1).
  m1, _ = alg.client_final(b, {}, two([-3.25, 5.25]), jnp.int32(3), {})
  np.testing.assert_allclose(model_w(m1["d"]), [1.0, -1.0], rtol=1e-6)
  # τ = 1: a = 1, θ_t − θ_i = (0.5, 0.25) = d.
  m2, _ = alg.client_final(b, {}, two([0.5, 0.75]), jnp.int32(1), {})
  # A padding client: no steps, a = 0, no NaN.
  m3, _ = alg.client_final(b, {}, two([1.0, 1.0]), jnp.int32(0), {})
  np.testing.assert_allclose(model_w(m3["d"]), [0.0, 0.0])
  # p = (0.5, 0.5, 0): τ_eff = 0.5·4.25 + 0.5·1 = 2.625; Σ p d = (0.75, −0.375);
  # pseudo-gradient = 2.625·(0.75, −0.375) = (1.96875, −0.984375).
  pseudo, _, metrics = alg.server_update(two([1.0, 1.0]), {}, stacked(m1, m2, m3),
                                         jnp.array([0.5, 0.5, 0.0]))
  np.testing.assert_allclose(model_w(pseudo), [1.96875, -0.984375], rtol=1e-6)
  np.testing.assert_allclose(metrics["tau_eff"], 2.625, rtol=1e-6)


def fedir_problem():
  """``logits = x·w`` for 2 classes (``w`` is the head kernel ``[1, 2]``), weighted CE."""

  def apply(model, x):
    z = x @ model["head"]["kernel"]
    return z, {"features": x}

  def objective(z, taps, adapters, batch):
    ce = cross_entropy(z, batch.y, mask=batch.mask, weight=batch.weight)
    return ce, {"total": ce, "ce": ce}

  return LocalProblem(apply=apply, objective=objective)


def test_fedir_weights_and_step_by_hand():
  params = {"model": {"head": {"kernel": jnp.zeros((1, 2))}}, "adapters": {}}
  # Client 0: labels (0, 0, 0, 1); client 1: (1, 1, 1, 1) plus a padding slot.
  y = jnp.array([[[0, 0, 0, 1, 0]], [[1, 1, 1, 1, 0]]])
  mask = jnp.array([[[True] * 4 + [False]], [[True] * 4 + [False]]])
  data = ClientData(x=jnp.zeros((2, 1, 5, 1)), y=y, mask=mask, num_examples=jnp.array([4, 4]))
  alg = fedir()
  state = alg.init_server_state(params, data)
  # Hsu et al. 2020: p = (3/8, 5/8); q_0 = (3/4, 1/4) → p/q_0 = (0.5, 2.5);
  # q_1 = (0, 1) → (0 for the absent class, 0.625).
  np.testing.assert_allclose(state["p"], [0.375, 0.625], rtol=1e-6)
  b = ServerBroadcast(params, state, jnp.int32(0), jnp.float32(0.1))
  row = lambda c: jax.tree.map(lambda a: a[c], data)
  ctx0, ctx1 = alg.client_init(b, {}, row(0)), alg.client_init(b, {}, row(1))
  np.testing.assert_allclose(ctx0["class_weight"], [0.5, 2.5], rtol=1e-6)
  np.testing.assert_allclose(ctx1["class_weight"], [0.0, 0.625], rtol=1e-6)
  # At w = 0 softmax = (½, ½); ∇_w ℓ = x (p − onehot(y)). Batch x = (1, 2), y = (0, 1):
  # [0.5·1·(−0.5, 0.5) + 2.5·2·(0.5, −0.5)] / 2 = (1.125, −1.125) (unweighted: (0.25, −0.25)).
  batch = Batch(x=jnp.array([[1.0], [2.0]]), y=jnp.array([0, 1]), mask=jnp.array([True, True]))
  grads, _ = alg.client_grad(params, ctx0, batch, fedir_problem(), None)
  np.testing.assert_allclose(grads["model"]["head"]["kernel"], [[1.125, -1.125]], rtol=1e-6)


def dense_problem():
  """Per-pixel ``logits = x·w`` (``w`` the 1x1-conv head kernel ``[1, 1, 1, K]``), CE with
  ignore label 255 and the importance weights FedIR passed, returned in ``aux``."""

  def apply(model, x):
    return x * model["head"]["kernel"].reshape(-1), {"decoder": x}

  def objective(z, taps, adapters, batch):
    ce = cross_entropy(z, batch.y, mask=batch.mask, ignore_index=255, weight=batch.weight)
    return ce, {"total": ce, "ce": ce, "weight": batch.weight}

  return LocalProblem(apply=apply, objective=objective)


def test_fedir_dense_labels_pixel_weights_by_hand():
  params = {"model": {"head": {"kernel": jnp.zeros((1, 1, 1, 3))}}, "adapters": {}}
  # 2x2 label maps, 3 classes, 255 = ignore. Client 0: a = [[0, 0], [1, 255]],
  # b = [[0, 0], [0, 2]]; client 1: c = [[1, 1], [255, 255]] and a padding image of 2s.
  a, b, c, pad = [[0, 0], [1, 255]], [[0, 0], [0, 2]], [[1, 1], [255, 255]], [[2, 2], [2, 2]]
  y = jnp.array([[[a, b]], [[c, pad]]], jnp.int32)
  mask = jnp.array([[[True, True]], [[True, False]]])
  data = ClientData(x=jnp.ones((2, 1, 2, 2, 2, 1)), y=y, mask=mask,
                    num_examples=jnp.array([2, 1]))
  alg = fedir()
  state = alg.init_server_state(params, data)
  # Valid pixels per class: client 0 (5, 1, 1), client 1 (0, 2, 0) ⇒ p = (5, 3, 1)/9;
  # q_0 = (5, 1, 1)/7 ⇒ p/q_0 = (7/9, 7/3, 7/9); q_1 = (0, 1, 0) ⇒ (0, 1/3, 0).
  np.testing.assert_allclose(state["p"], [5 / 9, 3 / 9, 1 / 9], rtol=1e-6)
  bc = ServerBroadcast(params, state, jnp.int32(0), jnp.float32(0.1))
  batch = lambda k, weight=None: Batch(data.x[k, 0], data.y[k, 0], data.mask[k, 0], weight)
  ctx0 = alg.client_init(bc, {}, jax.tree.map(lambda t: t[0], data))
  ctx1 = alg.client_init(bc, {}, jax.tree.map(lambda t: t[1], data))
  np.testing.assert_allclose(ctx0["class_weight"], [7 / 9, 7 / 3, 7 / 9], rtol=1e-6)
  np.testing.assert_allclose(ctx1["class_weight"], [0.0, 1 / 3, 0.0], rtol=1e-6)
  # Per-pixel weights with the labels' shape, 0 at the ignore label.
  grads, aux = alg.client_grad(params, ctx0, batch(0), dense_problem(), None)
  r, s = 7 / 9, 7 / 3
  np.testing.assert_allclose(aux["weight"], [[[r, r], [s, 0.0]], [[r, r], [r, r]]], rtol=1e-6)
  # At w = 0 every pixel's nll is ln 3 and ∇_w = x (1/3 − onehot(y)); x = 1, 7 valid pixels:
  # Σ w (1/3 − onehot) / 7 = 1/3 − (5r, s, r)/7 = 1/3 − p = (−2/9, 0, 2/9)
  # (unweighted: 1/3 − q_0 = (−8/21, 4/21, 4/21)). CE = Σ w ln 3 / 7 = ln 3.
  np.testing.assert_allclose(grads["model"]["head"]["kernel"].reshape(-1),
                             [-2 / 9, 0.0, 2 / 9], atol=1e-6)
  np.testing.assert_allclose(aux["ce"], np.log(3.0), rtol=1e-6)
  # Per-example weights of the incoming batch scale each image's pixel weights.
  _, aux = alg.client_grad(params, ctx0, batch(0, jnp.array([1.0, 0.5])), dense_problem(),
                           None)
  np.testing.assert_allclose(aux["weight"], [[[r, r], [s, 0.0]], [[r / 2] * 2] * 2], rtol=1e-6)
  # Client 1: ignored pixels and the padding image's (class 2, absent) get weight 0.
  _, aux = alg.client_grad(params, ctx1, batch(1), dense_problem(), None)
  np.testing.assert_allclose(aux["weight"], [[[1 / 3, 1 / 3], [0.0, 0.0]], [[0.0] * 2] * 2],
                             rtol=1e-6)


def test_fedavgm_server_momentum_by_hand():
  # Hsu et al. 2019: v ← βv + Δ, θ ← θ − η_s v with β = 0.9, η_s = 0.5, θ_0 = 0:
  # g_1 = (1, −2): v = (1, −2), θ_1 = (−0.5, 1);
  # g_2 = (0.5, 0.5): v = (1.4, −1.3), θ_2 = (−1.2, 1.65).
  tx = fedavgm(beta=0.9, server_lr=0.5).server_optimizer
  theta = jnp.zeros(2)
  state = tx.init(theta)
  for g, want in [([1.0, -2.0], [-0.5, 1.0]), ([0.5, 0.5], [-1.2, 1.65])]:
    u, state = tx.update(jnp.array(g), state, theta)
    theta = optax.apply_updates(theta, u)
    np.testing.assert_allclose(theta, want, rtol=1e-6)


# ---------------------------------------------------------------- FedAdagrad / FedAdam / FedYogi


def fedopt_numpy(rule, deltas, lr, b1, b2, tau):
  """Reddi et al. Algorithm 2 written in Δ terms (x ← x + η m/(√v + τ))."""
  x = np.zeros_like(deltas[0])
  m, v = np.zeros_like(x), np.full_like(x, tau**2)
  for d in deltas:
    m = b1 * m + (1 - b1) * d
    if rule == "adagrad":
      v = v + d * d
    elif rule == "adam":
      v = b2 * v + (1 - b2) * d * d
    else:
      v = v - (1 - b2) * d * d * np.sign(v - d * d)
    x = x + lr * m / (np.sqrt(v) + tau)
  return x


@pytest.mark.parametrize("rule", ["adagrad", "adam", "yogi"])
def test_fedopt_matches_numpy_algorithm_2(rule):
  rng = np.random.default_rng(0)
  deltas = [rng.normal(size=(3, 4)).astype(np.float32) * s for s in (1.0, 0.1, 3.0, 0.01, 1.0)]
  lr, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
  tx = adaptive_server_optimizer(rule, lr, b1=b1, b2=b2, tau=tau)
  params = {"w": jnp.zeros((3, 4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for d in deltas:
    # Our pseudo-gradient is θ_t − θ̃_{t+1} = −Δ.
    u, state = update({"w": -jnp.asarray(d)}, state, params)
    params = optax.apply_updates(params, u)
  want = fedopt_numpy(rule, [d.astype(np.float64) for d in deltas], lr, b1, b2, tau)
  np.testing.assert_allclose(params["w"], want, rtol=2e-5, atol=1e-6)
  chex.assert_trees_all_equal_shapes(state.m, params)


def test_fedopt_first_step_by_hand():
  # Δ = (1, −1), η = 0.1, β1 = 0.9, β2 = 0.99, τ = 0.75 (v_{−1} = 0.5625): m = (0.1, −0.1).
  # Adagrad: v = 1.5625, √v = 1.25 → x = ±0.1·0.1/2 = (0.005, −0.005).
  # Adam: v = 0.99·0.5625 + 0.01 = 0.566875, √v = 0.7529110 → ±0.01/1.5029110 = ±0.0066537.
  # Yogi: sign(0.5625 − 1) = −1 → v = 0.5625 + 0.01 = 0.5725, √v = 0.7566373
  #       → ±0.01/1.5066373 = ±0.0066373.
  for rule, want in [("adagrad", 0.005), ("adam", 0.0066537), ("yogi", 0.0066373)]:
    tx = adaptive_server_optimizer(rule, 0.1, b1=0.9, b2=0.99, tau=0.75)
    u, _ = tx.update(jnp.array([-1.0, 1.0]), tx.init(jnp.zeros(2)))
    np.testing.assert_allclose(u, [want, -want], rtol=1e-4)


@pytest.mark.parametrize("name,default_lr", [("fedadagrad", 0.1), ("fedadam", 0.01),
                                             ("fedyogi", 0.01)])
def test_fedopt_is_the_algorithms_server_optimizer(name, default_lr):
  c = default_config()
  c.fl.algorithm = name
  assert c.fl[name].learning_rate == default_lr and c.fl[name].tau == 1e-3
  alg = make_algorithm(c)
  assert alg.server_optimizer is not None and alg.client_grad is fedavg().client_grad


# ---------------------------------------------------------------- state across one engine round

# Four clients with one example each (x_i, y_i), θ = (1, 0), one local SGD step, η = 0.5:
#   client  x        y    ∇L_i(θ) = (x·θ − y) x    Δ_i = −η ∇L_i(θ)
#   0       (1, 0)   3    (−2, 0)                  (1, 0)
#   1       (0, 1)   1    (0, −1)                  (0, 0.5)
#   2       (1, 1)  −1    (2, 2)                   (−1, −1)
#   3       (0, 2)   2    (0, −4)                  (0, 2)
GRAD = np.array([[-2.0, 0.0], [0.0, -1.0], [2.0, 2.0], [0.0, -4.0]])
DELTA = np.array([[1.0, 0.0], [0.0, 0.5], [-1.0, -1.0], [0.0, 2.0]])


def quadratic_round(algorithm, seed=0):
  """One engine round of ``algorithm`` on the table above, 2 of 4 clients sampled.

  Returns the new state and the sampled clients (sorted).
  """
  data = ClientData(
      x=jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0]]).reshape(4, 1, 1, 2),
      y=jnp.array([3.0, 1.0, -1.0, 2.0]).reshape(4, 1, 1),
      mask=jnp.ones((4, 1, 1), bool), num_examples=jnp.ones(4, jnp.int32))
  params = two([1.0, 0.0])
  local = sgd_config(lr=0.5)
  server_opt = make_optimizer(sgd_config(lr=1.0))
  fns = RoundFns(algorithm, quadratic_problem(), make_optimizer(local),
                 functools.partial(learning_rate_at, local), server_opt)
  state = TrainState(
      params=params, opt_state=server_opt.init(params),
      alg_state=algorithm.init_server_state(params, data),
      client_states=init_client_states(algorithm, params, data, True),
      rng=jax.random.PRNGKey(seed), round=jnp.zeros((), jnp.int32),
      mix_weight=jnp.float32(0.5))
  sampled = np.sort(np.asarray(sample_clients(round_keys(state)[0], 4, 2)))
  engine = jax.jit(functools.partial(fl_round, fns=fns, spec=FLSpec(clients_per_round=2)))
  new, _ = engine(state, data)
  return new, sampled


def test_feddyn_state_after_one_round():
  new, sampled = quadratic_round(feddyn(alpha=0.1, num_clients=4))
  s = DELTA[sampled].sum(axis=0)
  # ∇L_i(θ_i^1) = 0 − 0.1 Δ_i for the sampled clients, 0 for the others.
  want_states = np.zeros((4, 2))
  want_states[sampled] = -0.1 * DELTA[sampled]
  np.testing.assert_allclose(model_w(new.client_states["alg"]["prev_grad"]), want_states,
                             atol=1e-7)
  # h = −(0.1/4) Σ Δ_i; θ^1 = θ^0 + ½ Σ Δ_i − h/0.1 = θ^0 + 0.75 Σ Δ_i.
  np.testing.assert_allclose(model_w(new.alg_state["h"]), -0.025 * s, atol=1e-7)
  np.testing.assert_allclose(model_w(new.params), np.array([1.0, 0.0]) + 0.75 * s, atol=1e-6)


def test_scaffold_only_sampled_clients_control_variates_change():
  new, sampled = quadratic_round(scaffold(num_clients=4), seed=3)
  # One step from x: c_i⁺ = (x − y_i)/(1·η) = ∇L_i(x); c = (1/4) Σ_{i∈S} c_i⁺.
  c_i = model_w(new.client_states["alg"]["c"])
  np.testing.assert_allclose(c_i[sampled], GRAD[sampled], atol=1e-6)
  np.testing.assert_array_equal(c_i[np.setdiff1d(np.arange(4), sampled)], 0.0)
  np.testing.assert_allclose(model_w(new.alg_state["c"]), GRAD[sampled].sum(axis=0) / 4,
                             atol=1e-6)
  np.testing.assert_allclose(model_w(new.params), [1.0, 0.0] + DELTA[sampled].mean(axis=0),
                             atol=1e-6)


# ---------------------------------------------------------------- FedSoL with these proximal terms


def test_fedsol_perturbs_along_the_feddyn_term():
  # FedSoL App. H: ε = ρ g_p/‖g_p‖ with g_p = ∇[−⟨∇L_i, w⟩ + (α/2)‖w − w_g‖²].
  # At w = w_g = (1, 2) with ∇L_i = (0.6, −0.8): g_p = (−0.6, 0.8), ‖g_p‖ = 1, ρ = 0.5:
  # ε = (−0.3, 0.4); ∇L(w + ε) with w + ε = (0.7, 2.4): r = (0.7, 1.4) → (0.35, 0.7).
  c = default_config()
  c.fl.algorithm, c.fl.num_clients, c.fl.clients_per_round = "fedsol", 4, 2
  c.fl.fedsol.proximal, c.fl.fedsol.rho, c.fl.feddyn.alpha = "feddyn", 0.5, 0.1
  validate(c)
  alg = make_algorithm(c)
  ctx = alg.client_init(broadcast([1.0, 2.0]), {"prev_grad": two([0.6, -0.8])}, None)
  grads, _ = alg.client_grad(two([1.0, 2.0]), ctx, BATCH_A, quadratic_problem(), None)
  np.testing.assert_allclose(model_w(grads), [0.35, 0.7], rtol=1e-5)


def test_fedsol_perturbs_along_the_fedprox_term():
  # g_p = μ(w − w_g) = 0.1·(0.3, 0.4) → ε = 0.5·(0.6, 0.8) = (0.3, 0.4);
  # w + ε = (1.3, 2.4) → r = (1.3, 1.4) → ∇ = (0.65, 0.7).
  c = default_config()
  c.fl.algorithm, c.fl.fedsol.proximal, c.fl.fedsol.rho = "fedsol", "fedprox", 0.5
  c.fl.fedprox.mu = 0.1
  alg = make_algorithm(c)
  ctx = alg.client_init(broadcast([0.7, 1.6]), {}, None)
  grads, _ = alg.client_grad(two([1.0, 2.0]), ctx, BATCH_A, quadratic_problem(), None)
  np.testing.assert_allclose(model_w(grads), [0.65, 0.7], rtol=1e-5)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize("algorithm,setting,value", [
    ("fedprox", "mu", -0.1),
    ("feddyn", "alpha", -1.0),
    ("fedavgm", "beta", 1.0),
    ("fedavgm", "server_lr", 0.0),
    ("fedadagrad", "learning_rate", 0.0),
    ("fedadagrad", "tau", 0.0),
    ("fedadam", "b1", 1.0),
    ("fedadam", "b2", -0.5),
    ("fedyogi", "tau", -1e-3),
    ("fedyogi", "b2", 1.5),
])
def test_bad_hyper_parameter_is_a_one_line_config_error(algorithm, setting, value):
  c = default_config()
  c.fl.algorithm = algorithm
  c.fl[algorithm][setting] = value
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert f"fl.{algorithm}.{setting}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "adagrad", "rmsprop"])
@pytest.mark.parametrize("algorithm", ["scaffold", "fednova"])
def test_local_sgd_algorithms_reject_other_client_optimizers(algorithm, optimizer):
  # SCAFFOLD's option II and FedNova's ‖a_i‖₁ are defined for local SGD only: any other
  # client optimizer used to run and silently compute something that is no gradient.
  c = default_config()
  c.fl.algorithm, c.client_optimizer.name = algorithm, optimizer
  with pytest.raises(ConfigError, match=(
      rf"^fl\.algorithm='{algorithm}' needs client_optimizer\.name='sgd' "
      rf"\(got '{optimizer}'\): .*\(Karimireddy|Wang et al\. 2020")) as e:
    validate(c)
  assert "\n" not in str(e.value)
  # SGD with momentum, Nesterov and weight decay stays valid.
  c.client_optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
  validate(c)


def test_bad_proximal_weight_through_fedsol_names_its_setting():
  c = default_config()
  c.fl.algorithm, c.fl.fedsol.proximal, c.fl.fedprox.mu = "fedsol", "fedprox", -1.0
  with pytest.raises(ConfigError, match=r"fl\.fedprox\.mu"):
    validate(c)
