"""FedSAM, FedASAM, FedSoL and the optax perturbation chain (methods §4)."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support import UNEVEN_SIZES, assert_trees_close, small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, LocalProblem, ServerBroadcast
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedsol import fedasam, fedsam, fedsol, head_body_mask, kl_proximal_loss
from isr_jax.fl.registry import PROXIMAL_SOURCES, PROXIMAL_STATIONARY, make_algorithm
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec
from isr_jax.losses import cross_entropy
from isr_jax.sam import perturbation, perturbed_gradient, sam_optimizer

LN3 = math.log(3.0)


def two_param_problem():
  """logits = x ⊙ w for a 2-class problem: two parameters, closed-form gradients."""

  def apply(model, x):
    z = x * model["w"]
    return z, {"features": z}

  def objective(logits, taps, adapters, batch):
    ce = cross_entropy(logits, batch.y, mask=batch.mask)
    return ce, {"ce": ce, "total": ce}

  return LocalProblem(apply=apply, objective=objective)


def one_step(alg, local_w, global_w, lr=0.1):
  problem = two_param_problem()
  params = {"model": {"w": jnp.asarray(local_w)}, "adapters": {}}
  broadcast = ServerBroadcast({"model": {"w": jnp.asarray(global_w)}, "adapters": {}}, {},
                              jnp.int32(0), jnp.float32(lr))
  ctx = alg.client_init(broadcast, {}, None)
  batch = Batch(jnp.array([[1.0, 1.0]]), jnp.array([0]), jnp.array([True]))
  grads, aux = jax.jit(lambda p: alg.client_grad(p, ctx, batch, problem,
                                                 jax.random.PRNGKey(0)))(params)
  return np.asarray(params["model"]["w"] - lr * grads["model"]["w"]), aux


def test_fedsol_fixed_radius_hand_computed():
  # w_g = 0, w_k = [ln 3, 0], x = [1, 1], y = 0, τ = 1, ρ = √2:
  # p_k = [3/4, 1/4], p_g = [1/2, 1/2] ⇒ g_p = p_k − p_g = [1/4, −1/4],
  # ε = ρ g_p/‖g_p‖ = [1, −1]; at w + ε, z = [ln3 + 1, −1], p0 = 3e²/(3e² + 1),
  # ∇CE = [p0 − 1, 1 − p0] = [−0.0431645, 0.0431645]; SGD(0.1) from w (not w + ε).
  alg = fedsol(rho=math.sqrt(2.0), tau=1.0)
  w, _ = one_step(alg, [LN3, 0.0], [0.0, 0.0])
  np.testing.assert_allclose(w, [1.1029287, -0.0043165], atol=1e-6)


def test_fedsol_adaptive_radius_hand_computed():
  # Λ = |w_k − w_g| / ‖w_k − w_g‖ = [1, 0] ⇒ ε = [1, 0]; z = [ln3 + 1, 0],
  # p0 = 3e/(3e + 1), ∇CE = [−0.1092318, 0.1092318].
  alg = fedsol(rho=math.sqrt(2.0), tau=1.0, adaptive=True)
  w, _ = one_step(alg, [LN3, 0.0], [0.0, 0.0])
  np.testing.assert_allclose(w, [1.1095355, -0.0109232], atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_fedsol_first_step_has_no_perturbation_and_no_nan(adaptive):
  # w_k = w_g: the proximal gradient is exactly zero; the step must be the plain one.
  alg = fedsol(rho=2.0, tau=3.0, adaptive=adaptive)
  w, aux = one_step(alg, [LN3, 0.5], [LN3, 0.5])
  plain, _ = one_step(fedavg(), [LN3, 0.5], [LN3, 0.5])
  assert np.all(np.isfinite(w)) and all(np.isfinite(float(v)) for v in aux.values())
  np.testing.assert_allclose(w, plain, atol=1e-7)


def test_kl_proximal_loss_is_zero_at_the_anchor_and_positive_elsewhere():
  problem = two_param_problem()
  batch = Batch(jnp.array([[1.0, 2.0], [0.5, -1.0]]), jnp.array([0, 1]), jnp.array([True, True]))
  anchor = {"model": {"w": jnp.array([0.3, -0.2])}, "adapters": {}}
  loss = kl_proximal_loss(3.0)
  assert float(loss(anchor, anchor, {}, batch, problem, None)) == 0.0
  moved = {"model": {"w": jnp.array([1.0, 0.5])}, "adapters": {}}
  assert float(loss(moved, anchor, {}, batch, problem, None)) > 0.0


def test_asam_perturbation_hand_computed():
  # T = |w| + η = [1.01, 2.01]; ε = ρ T² g / ‖T g‖ for g = [0.3, 0.4], ρ = 1.
  tx = perturbation(1.0, asam_eta=0.01)
  w = {"w": jnp.array([1.0, -2.0])}
  eps, _ = tx.update({"w": jnp.array([0.3, 0.4])}, tx.init(w), w)
  np.testing.assert_allclose(eps["w"], [0.3561801, 1.8808655], rtol=1e-6)


def test_adaptive_radius_is_per_layer():
  # Two tensors that moved by different amounts: each is normalised by its own norm.
  tx = perturbation(1.0, adaptive_radius=True)
  anchor = {"a": jnp.array([0.0, 0.0]), "b": jnp.array([0.0, 0.0, 0.0])}
  params = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 0.0, 10.0])}
  g = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([1.0, 1.0, 1.0])}
  eps, _ = tx.update(g, tx.init(anchor), params)
  unit = 1 / math.sqrt(5.0)  # g / ‖g‖ over all 5 entries
  np.testing.assert_allclose(eps["a"], [0.6 * unit, 0.8 * unit], rtol=1e-6)
  np.testing.assert_allclose(eps["b"], [0.0, 0.0, unit], rtol=1e-6)


@pytest.mark.parametrize("target", ["head", "body"])
def test_partial_perturbation_leaves_other_layers_unperturbed(target):
  state, fns, _ = small_setup(isr=True)
  params = state.params
  mask = head_body_mask(params, target)
  tx = perturbation(0.5, mask=mask)
  grads, _ = jax.grad(lambda p: fns.problem.loss(
      p, Batch(jnp.ones((4, 8, 8, 1)), jnp.arange(4), jnp.ones(4, bool))), has_aux=True)(params)
  _, _, eps = perturbed_gradient(tx, tx.init(params), params, grads,
                                 lambda p: (p, None))
  flat_eps = jax.tree_util.tree_flatten_with_path(eps)[0]
  flat_mask = jax.tree.leaves(mask)
  touched = 0.0
  for (path, e), keep in zip(flat_eps, flat_mask, strict=True):
    if keep:
      touched += float(jnp.sum(e ** 2))
    else:
      assert float(jnp.abs(e).max()) == 0.0, path
  np.testing.assert_allclose(math.sqrt(touched), 0.5, rtol=1e-5)  # ‖ε‖ = ρ on the subset
  heads = [keep for (path, _), keep in zip(flat_eps, flat_mask, strict=True)
           if getattr(path[1], "key", None) == "head" and path[0].key == "model"]
  assert all(heads) == (target == "head")


def test_sam_optimizer_matches_optax_contrib_sam():
  """A = B: our wrapper computes optax.contrib.sam's opaque-mode step."""
  w = {"w": jnp.array([0.5, -1.0, 2.0])}
  target = jnp.array([1.0, 0.0, -1.0])
  loss = lambda p: jnp.sum((p["w"] - target) ** 2 * jnp.array([1.0, 3.0, 0.5]))
  grad = jax.grad(loss)
  ours = sam_optimizer(optax.sgd(0.1), perturbation(0.2))
  theirs = optax.contrib.sam(optax.sgd(0.1), optax.chain(optax.contrib.normalize(),
                                                          optax.sgd(0.2)),
                             sync_period=2, opaque_mode=True)
  s1, s2, p1, p2 = ours.init(w), theirs.init(w), w, w
  for _ in range(3):
    u1, s1 = ours.update(grad(p1), s1, p1, grad_fn=grad)
    u2, s2 = theirs.update(grad(p2), s2, p2, grad_fn=lambda p, i: grad(p))
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)


@pytest.mark.parametrize("make", [lambda: fedsol(rho=0.0), lambda: fedsol(rho=0.0, adaptive=True),
                                  lambda: fedsam(rho=0.0), lambda: fedasam(rho=0.0)])
def test_zero_radius_is_fedavg(make):
  data = uneven_clients()
  spec = FLSpec(clients_per_round=3, local_epochs=1)
  results = []
  for alg in (fedavg(), make()):
    state, fns, _ = small_setup(isr=True, algorithm=alg, data=data)
    step = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))
    for _ in range(2):
      state, _ = step(state, data)
    results.append(state.params)
  assert_trees_close(results[0], results[1], atol=1e-6)


def test_fedsol_client_gradient_on_lenet_matches_a_reference():
  # w_k ≠ w_g on LeNet-5 with ISR: ∇L_T(w + ε), ε = ρ g_p/‖g_p‖, with g_p from
  # autodiff of the plain KL expression (not the custom VJP) over the real examples.
  state, fns, _ = small_setup(isr=True)
  problem, w_g, rho = fns.problem, state.params, 0.5
  noise = jax.random.split(jax.random.PRNGKey(3), len(jax.tree.leaves(w_g)))
  w_k = jax.tree.map(lambda w, k: w + 0.05 * jax.random.normal(k, w.shape), w_g,
                     jax.tree.unflatten(jax.tree.structure(w_g), list(noise)))
  data = uneven_clients()
  mask = data.mask[1, 0].at[-2:].set(False)  # two padding rows must not count
  batch = Batch(data.x[1, 0], data.y[1, 0], mask)
  alg = fedsol(rho=rho)
  ctx = alg.client_init(ServerBroadcast(w_g, {}, jnp.int32(0), jnp.float32(0.1)), {}, None)
  got, _ = jax.jit(lambda p: alg.client_grad(p, ctx, batch, problem, jax.random.PRNGKey(0)))(w_k)

  def plain_kl(p):
    log_k = jax.nn.log_softmax(problem.apply(p["model"], batch.x)[0] / 3.0)
    log_g = jax.nn.log_softmax(problem.apply(w_g["model"], batch.x)[0] / 3.0)
    kl = jnp.sum(jnp.exp(log_g) * (log_g - log_k), axis=-1)
    return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.sum(mask)

  g_p = jax.grad(plain_kl)(w_k)
  norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(g_p)))
  w_plus = jax.tree.map(lambda w, g: w + rho * g / norm, w_k, g_p)
  loss_grad = jax.grad(lambda p: problem.loss(p, batch)[0])
  assert_trees_close(got, loss_grad(w_plus), atol=2e-5, rtol=1e-4)
  plain = loss_grad(w_k)  # and the perturbation is not negligible
  assert max(float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(got), jax.tree.leaves(plain), strict=True)) > 1e-2


def source_step(source, settings, rho, local_w, global_w, client_state):
  """One jitted client gradient of registry-built FedSoL with ``proximal=source``."""
  c = default_config()
  c.fl.algorithm, c.fl.fedsol.proximal, c.fl.fedsol.rho = "fedsol", source, rho
  for key, value in settings.items():
    c.fl[source][key] = value
  alg = make_algorithm(c)
  w_params = lambda w: {"model": {"w": jnp.asarray(w, jnp.float32)}, "adapters": {}}
  ctx = alg.client_init(ServerBroadcast(w_params(global_w), {}, jnp.int32(0), jnp.float32(0.1)),
                        client_state(w_params), None)
  batch = Batch(jnp.array([[1.0, 1.0]]), jnp.array([0]), jnp.array([True]))
  grads, _ = jax.jit(lambda p: alg.client_grad(p, ctx, batch, two_param_problem(),
                                               jax.random.PRNGKey(0)))(w_params(local_w))
  return np.asarray(grads["model"]["w"])


# x = [1, 1], y = 0, so z = w and ∇CE(z) = [p0 − 1, 1 − p0], p0 = σ(z0 − z1); the
# expected values are ∇CE at w + ε with ε from each source's own proximal gradient.
SOURCE_CASES = {
    # g_p = μ(w − w_g) = μ[0, −1] ⇒ ε = [0, −1]; z = [1, −1], p0 = σ(2).
    "fedprox_moved": ("fedprox", {"mu": 0.1}, 1.0, [1.0, 0.0], [1.0, 1.0],
                      lambda w: {}, [-0.1192029, 0.1192029]),
    # g_p = α(w − w_g) − ∇L_i = [0, −1] − [−1, 0] = [1, −1] ⇒ ε = [1, −1] (ρ = √2);
    # z = [2, −1], p0 = σ(3).
    "feddyn_moved": ("feddyn", {"alpha": 1.0}, math.sqrt(2.0), [1.0, 0.0], [1.0, 1.0],
                     lambda w: {"prev_grad": w([-1.0, 0.0])}, [-0.0474259, 0.0474259]),
    # At w = w_g FedDyn's gradient is genuine: g_p = −∇L_i = [1, 0] ⇒ z = [2, 0], p0 = σ(2).
    "feddyn_at_anchor": ("feddyn", {"alpha": 1.0}, 1.0, [1.0, 0.0], [1.0, 0.0],
                         lambda w: {"prev_grad": w([-1.0, 0.0])}, [-0.1192029, 0.1192029]),
    # MOON (τ = 0.5): z = [1, 0], z_glob = [1, 1], z_prev = [0, 1]; ∂ℓ_con/∂z =
    # [0, 0.1145624] (tests/test_representation_algorithms.py) ⇒ ε = [0, 1];
    # z = [1, 1], p0 = 1/2.
    "moon_moved": ("moon", {"mu": 1.0, "tau": 0.5}, 1.0, [1.0, 0.0], [1.0, 1.0],
                   lambda w: {"prev": w([0.0, 1.0])["model"]}, [-0.5, 0.5]),
    # At w = w_g (z = z_glob = [1, 1]) with z_prev = [0, 1] ≠ z_glob, ∂ℓ_con/∂z =
    # σ(neg − pos)/τ ∇cos(z, z_prev) ∝ [−1, 1] ⇒ ε = [−1, 1] (ρ = √2); z = [0, 2], p0 = σ(−2).
    "moon_at_anchor": ("moon", {"mu": 1.0, "tau": 0.5}, math.sqrt(2.0), [1.0, 1.0], [1.0, 1.0],
                       lambda w: {"prev": w([0.0, 1.0])["model"]}, [-0.8807971, 0.8807971]),
    # Previous model = global (round 1): ℓ_con = log 2 for every w ⇒ ε = 0 although
    # w ≠ w_g; z = [1, 0], p0 = σ(1).
    "moon_first_round": ("moon", {"mu": 1.0, "tau": 0.5}, 1.0, [1.0, 0.0], [1.0, 1.0],
                         lambda w: {"prev": w([1.0, 1.0])["model"]}, [-0.2689414, 0.2689414]),
}


@pytest.mark.parametrize("case", sorted(SOURCE_CASES))
def test_proximal_source_drives_the_perturbation_hand_computed(case):
  source, settings, rho, local_w, global_w, client_state, want = SOURCE_CASES[case]
  got = source_step(source, settings, rho, local_w, global_w, client_state)
  np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize(
    "name,setting,value,message",
    [
        ("fedsol", "rho", -0.1, r"fl\.fedsol\.rho=-0\.1 must be in \[0, inf\)"),
        ("fedsol", "perturb", "tail", r"fl\.fedsol\.perturb='tail' is not one of"),
        ("fedsol", "proximal", "l2", r"fl\.fedsol\.proximal='l2' is not one of \[.*'kl'"),
        ("fedsol", "tau", 0.0, r"fl\.fedsol\.tau=0\.0 must be in \(0, inf\)"),
        ("fedsam", "rho", -1.0, r"fl\.fedsam\.rho=-1\.0"),
        ("fedasam", "eta", -1.0, r"fl\.fedasam\.eta=-1\.0"),
    ],
)
def test_bad_hyperparameters(name, setting, value, message):
  c = default_config()
  c.fl.algorithm = name
  c.fl[name][setting] = value
  with pytest.raises(ConfigError, match=message) as info:
    validate(c)
  assert "\n" not in str(info.value)


def test_head_body_mask_partitions_the_model():
  state, _, _ = small_setup(isr=True)
  head = jax.tree.leaves(head_body_mask(state.params, "head"))
  body = jax.tree.leaves(head_body_mask(state.params, "body"))
  every = jax.tree.leaves(head_body_mask(state.params, "all"))
  assert all(every) and any(head) and any(body)
  assert not any(h and b for h, b in zip(head, body, strict=True))
  chex.assert_trees_all_equal_structs(head_body_mask(state.params, "head"), state.params)


def test_softened_kl_gradient_is_exact_and_zero_at_equal_logits():
  from isr_jax.fl.algorithms.fedsol import softened_kl

  z = jnp.array([[0.3, -1.2, 2.0], [1.0, 1.0, -0.5]])
  assert float(jnp.abs(jax.grad(lambda a: softened_kl(a, z, 3.0).sum())(z)).max()) == 0.0
  # Elsewhere the closed form agrees with autodiff of the plain expression.
  z_k = z + jnp.array([[0.5, 0.0, -0.3], [0.0, 0.2, 0.1]])

  def plain(a):
    lk, lg = jax.nn.log_softmax(a / 3.0), jax.nn.log_softmax(z / 3.0)
    return jnp.sum(jnp.exp(lg) * (lg - lk))

  np.testing.assert_allclose(jax.grad(lambda a: softened_kl(a, z, 3.0).sum())(z_k),
                             jax.grad(plain)(z_k), atol=1e-6)


# FedSoL's proximal source -> the algorithm whose round a one-step FedSoL round
# must reproduce: on the first local step of round 1 every source's gradient
# vanishes (w = w_g; FedDyn's ∇L_i = 0; MOON's previous model is the global one),
# so ε = 0 and both take one plain step; the base keeps its own server rule.
# What FedSoL's first local step equals with each source: its base algorithm's first step,
# except FedProx's, which is a proximal step after the gradient step (FedSoL steps on ∇F
# alone, and the FedProx term's gradient vanishes at w = w_g): FedAvg's.
SOURCE_BASE = {"kl": "fedavg", "fedprox": "fedavg", "feddyn": "feddyn", "moon": "moon"}


def registry_algorithm(name, **fedsol_settings):
  c = default_config()
  c.fl.algorithm, c.fl.num_clients = name, len(UNEVEN_SIZES)
  c.fl.fedprox.mu, c.fl.feddyn.alpha, c.fl.moon.mu = 0.1, 0.1, 1.0
  for key, value in fedsol_settings.items():
    c.fl.fedsol[key] = value
  return make_algorithm(c)



def one_jitted_round(alg, *, isr, model="lenet5"):
  """``(w_0, w_1)`` of one jitted one-step ``fl_round`` on a real model."""
  data = uneven_clients()
  state, fns, _ = small_setup(isr=isr, algorithm=alg, data=data, model=model)
  step = jax.jit(functools.partial(fl_round, fns=fns,
                                   spec=FLSpec(clients_per_round=3, local_steps=1)))
  return state.params, step(state, data)[0].params


def assert_same_round(got, want, start):
  """``got == want`` to 1e-6, and the round moved the model well beyond that."""
  moved = max(float(jnp.abs(a - b).max())
              for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(start), strict=True))
  assert moved > 1e-3, moved
  assert_trees_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("isr", [False, True])
def test_jitted_first_step_of_fedsol_is_fedavg_on_lenet(isr):
  # Fixed radius ρ = 2: under jit the local and global logits round differently,
  # and the perturbation must still be exactly zero on the first local step.
  start, want = one_jitted_round(fedavg(), isr=isr)
  _, got = one_jitted_round(fedsol(rho=2.0), isr=isr)
  assert_same_round(got, want, start)


def test_every_proximal_source_declares_its_stationary_points():
  # A new source must say where its gradient vanishes by construction (or None).
  assert set(PROXIMAL_STATIONARY) == set(PROXIMAL_SOURCES) == set(SOURCE_BASE)


@pytest.mark.parametrize("source", ["fedprox", "feddyn", "moon"])
def test_jitted_first_step_of_every_proximal_source_is_its_base(source):
  start, want = one_jitted_round(registry_algorithm(SOURCE_BASE[source]), isr=True)
  _, got = one_jitted_round(registry_algorithm("fedsol", rho=2.0, proximal=source), isr=True)
  assert_same_round(got, want, start)
