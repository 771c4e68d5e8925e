"""Client-level DP (isr_jax.fl.channel.dp, .accountant): DP-FedAvg's clipping and noise,
adaptive clipping, the privacy accountant, Poisson sampling and the settings it refuses."""

import math

import chex
import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.errors import ConfigError
from isr_jax.fl.channel import accountant, dp
from isr_jax.fl.channel.pipeline import init_server_state
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.round import make_round
from isr_jax.fl.selection import poisson_sample, sample_clients, select_clients
from isr_jax.fl.spec import FLSpec


def dp_spec(**changes) -> dp.DPSpec:
  """A DPSpec with every derived number given (no calibration)."""
  fields = dict(clip_norm=1.0, noise_multiplier=0.0, update_noise_multiplier=0.0, delta=1e-5,
                adaptive=False, target_quantile=0.5, clip_learning_rate=0.2,
                count_noise_std=0.0, expected_clients=4.0, sampling="fixed", sampling_rate=1.0,
                num_clients=4, accountant="rdp", target_epsilon=0.0)
  return dp.DPSpec(**{**fields, **changes})


def stacked_messages(key, k=8, scales=(0.1, 50.0, 0.3, 7.0, 1e3, 0.02, 2.0, 90.0)):
  """A two-leaf message pytree ``[k, ...]`` whose rows have very different norms."""
  ka, kb = jax.random.split(key)
  scale = jnp.asarray(scales[:k], jnp.float32)
  return {"delta": {"w": jax.random.normal(ka, (k, 3, 4)) * scale[:, None, None],
                    "b": jax.random.normal(kb, (k, 5)) * scale[:, None]}}


def test_clip_rows_bounds_every_real_row_and_drops_padding():
  messages = stacked_messages(jax.random.PRNGKey(0))
  real = jnp.asarray([True, True, True, False, True, True, False, True])
  clip = jnp.float32(1.5)
  clipped, norms = jax.jit(dp.clip_rows)(messages, real, clip)
  after = dp.row_norms(clipped)
  np.testing.assert_allclose(norms, dp.row_norms(messages), rtol=1e-6)
  assert bool(jnp.all(after <= clip * (1 + 1e-6)))
  over = np.asarray((norms > clip) & real)
  assert over.sum() >= 3  # the test exercises clipping
  np.testing.assert_allclose(after[over], clip, rtol=1e-5)  # clipped onto the sphere ...
  for leaf, leaf_clipped in zip(jax.tree.leaves(messages), jax.tree.leaves(clipped),
                                strict=True):
    within = np.asarray((norms <= clip) & real)
    np.testing.assert_array_equal(leaf_clipped[within], leaf[within])  # ... the rest untouched
    assert not np.any(np.asarray(leaf_clipped)[~np.asarray(real)])  # padding rows are zero
    cos = jnp.sum((leaf * leaf_clipped).reshape(8, -1), 1)  # the direction is kept
    assert bool(jnp.all(cos[over] > 0))


def test_noise_has_the_stated_std_and_zero_mean():
  """``N(0, (zC)²)`` on the sum, ``/K̄``: std ``zC/K̄`` on each coordinate of the mean.

  Over ``n`` coordinates the sample variance's relative spread is ``√(2/n)``
  (chi-square with ``n`` degrees of freedom): n = 2¹⁸ puts the std within 0.7% at 5σ.
  """
  n, z, c, k_bar = 2 ** 18, 1.3, 0.7, 4.0
  spec = dp_spec(noise_multiplier=z, update_noise_multiplier=z, clip_norm=c,
                 expected_clients=k_bar)
  messages = {"delta": {"a": jnp.zeros((4, n // 2)), "b": jnp.zeros((4, 2, n // 4))}}
  real = jnp.ones((4,), bool)
  mean, state, metrics = jax.jit(dp.privatize, static_argnums=4)(
      jax.random.PRNGKey(3), messages, real, dp.init_state(spec), spec)
  noise = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mean)]).astype(np.float64)
  want = z * c / k_bar
  assert noise.size == n
  assert abs(noise.std() / want - 1) < 5 * math.sqrt(1 / (2 * n))
  assert abs(noise.mean()) < 5 * want / math.sqrt(n)
  np.testing.assert_allclose(metrics["dp/noise_std"], want, rtol=1e-6)
  np.testing.assert_allclose(metrics["dp/clip_norm"], c, rtol=1e-6)
  assert float(state["clip_norm"]) == pytest.approx(c)  # fixed clipping keeps C
  # The leaves draw independent noise (no key reused across them).
  a, b = np.ravel(mean["delta"]["a"]), np.ravel(mean["delta"]["b"])
  assert abs(np.corrcoef(a, b)[0, 1]) < 5 / math.sqrt(a.size)


def test_adaptive_clipping_tracks_the_target_quantile():
  """Andrew et al. Alg. 1 without noise: ``C`` moves geometrically to the γ-quantile."""
  norms = jnp.arange(1.0, 21.0)  # 20 clients, norms 1..20
  messages = {"delta": norms[:, None]}  # row i's norm is i + 1
  real = jnp.ones((20,), bool)

  def run(gamma):
    spec = dp_spec(adaptive=True, target_quantile=gamma, clip_learning_rate=0.2,
                   expected_clients=20.0, clip_norm=0.5)

    def step(state, key):
      _, state, metrics = dp.privatize(key, messages, real, state, spec)
      return state, metrics["dp/clipped_fraction"]

    state, clipped = jax.lax.scan(step, dp.init_state(spec),
                                  jax.random.split(jax.random.PRNGKey(0), 150))
    return float(state["clip_norm"]), np.asarray(clipped)

  for gamma, (low, high) in ((0.5, (9.0, 12.0)), (0.8, (15.0, 18.0))):
    final, clipped = run(gamma)
    assert low <= final <= high, (gamma, final)
    np.testing.assert_allclose(clipped[-10:].mean(), 1 - gamma, atol=0.1)
  assert run(0.5)[1][0] == 1.0  # C = 0.5 clipped everyone in round 0


# dp-accounting's RDP accountant against TensorFlow Privacy's published example:
# tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py, 'Test0' — DP-SGD
# with n = 60000, batch 150 (Poisson, q = 0.0025), z = 1.3, 15 epochs (6000 steps),
# δ = 1e-5: ε = 0.7242234026109595 (optimal RDP order 19); and
# compute_noise_from_budget_test.py 'Test0', its inverse: that ε gives z = 1.3.
MNIST_EPSILON = 0.7242234026109595


def test_epsilon_matches_tensorflow_privacy_published_example():
  mech = accountant.Mechanism(1.3, "poisson", 150 / 60000, 60000, 150.0, "rdp", 1e-5)
  acc = accountant.make_accountant("rdp", "poisson")
  assert acc.compose(accountant.dp_event(mech, 6000)).get_epsilon(1e-5) == pytest.approx(
      MNIST_EPSILON, abs=1e-9)
  # epsilon_spent adds the Poisson lanes' overflow charge (p < 1e-12 a round): a hair more.
  spent = accountant.epsilon_spent(mech, 6000)
  assert MNIST_EPSILON <= spent < MNIST_EPSILON + 2e-4
  assert accountant.epsilon_spent(mech, 0) == 0.0
  assert accountant.epsilon_spent(mech, 3000) < spent  # ε grows with the rounds
  z = accountant.calibrate_noise_multiplier(
      MNIST_EPSILON, 1e-5, sampling_rate=150 / 60000, num_clients=60000,
      clients_per_round=150, rounds=6000, accountant="rdp", sampling="poisson")
  assert z == pytest.approx(1.3, abs=1e-3)
  assert accountant.epsilon_spent(mech._replace(noise_multiplier=z), 6000) <= (
      MNIST_EPSILON + 1e-6)


def test_fixed_size_sampling_is_accounted_as_replace_one_with_sensitivity_2c():
  mech = accountant.Mechanism(1.0, "fixed", 0.5, 20, 10.0, "rdp", 1e-5)
  acc = dp_accounting.rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  event = dp_accounting.SampledWithoutReplacementDpEvent(20, 10,
                                                         dp_accounting.GaussianDpEvent(0.5))
  expected = acc.compose(event, 50).get_epsilon(1e-5)
  assert accountant.epsilon_spent(mech, 50) == pytest.approx(expected, rel=1e-12)
  assert accountant.epsilon_spent(mech._replace(noise_multiplier=0.0), 5) == math.inf


def test_pld_accountant_composes_rounds_incrementally():
  mech = accountant.Mechanism(1.0, "poisson", 0.5, 6, 3.0, "pld", 1e-5)  # 6 lanes: no overflow
  first = accountant.epsilon_spent(mech, 2)
  later = accountant.epsilon_spent(mech, 5)  # composed onto the cached 2 rounds
  acc = accountant.make_accountant("pld", "poisson")
  assert later == pytest.approx(acc.compose(accountant.dp_event(mech, 5)).get_epsilon(1e-5),
                                rel=1e-3)
  assert first < later
  assert accountant.epsilon_spent(mech, 2) == pytest.approx(first, rel=1e-3)  # back: recomposed


def dp_config(**dp_settings):
  config = default_config()
  config.fl.dp.enabled = True
  for name, value in dp_settings.items():
    config.fl.dp[name] = value
  return config


@pytest.mark.parametrize("settings, needle", [
    (dict(accountant="pld", sampling="fixed"), "fl.dp.accountant"),
    (dict(adaptive_clipping=True, noise_multiplier=0.0), "fl.dp.adaptive_clipping"),
    (dict(target_epsilon=1e-3), "fl.dp.target_epsilon"),
])
def test_settings_refuse_in_one_line(settings, needle):
  with pytest.raises(ConfigError) as err:
    dp.settings(dp_config(**settings))
  assert needle in str(err.value) and "\n" not in str(err.value)


def test_dp_with_an_algorithm_that_reads_each_message_is_refused_at_validate():
  config = dp_config()
  config.fl.algorithm = "scaffold"
  with pytest.raises(ConfigError, match="scaffold") as err:
    validate(config)
  assert "fl.dp.enabled" in str(err.value) and "\n" not in str(err.value)


def test_settings_resolve_the_spec():
  spec = dp.settings(dp_config(adaptive_clipping=True, noise_multiplier=0.5,
                               count_noise_std=1.0))
  assert spec.expected_clients == 10 and spec.sampling_rate == 0.5 and spec.adaptive
  # The update's noise leaves σ_b its share (Andrew et al. Thm. 1): z⁻² = z_Δ⁻² + (2σ_b)⁻².
  assert spec.noise_multiplier ** -2 == pytest.approx(
      spec.update_noise_multiplier ** -2 + (2 * spec.count_noise_std) ** -2)
  assert dp.settings(default_config()) is None


@pytest.fixture(scope="module")
def equal_clients():
  """Four clients of 16 examples each, every one sampled: FedAvg's weights are 1/K̄."""
  data = uneven_clients(sizes=(16, 16, 16, 16))
  state, fns, _ = small_setup(data=data)
  return state, fns, data


def test_noiseless_unclipped_dp_round_is_fedavg_bit_for_bit(equal_clients):
  state, fns, data = equal_clients

  def run(channel):
    spec = FLSpec(clients_per_round=4, channel=channel)
    built = make_round(fns.algorithm, fns.problem, spec, local_optimizer=fns.local_optimizer,
                       local_lr=fns.local_lr, server_optimizer=fns.server_optimizer)
    start = state._replace(channel_state=init_server_state(channel))
    return built.jit()(start, data)

  channel = ChannelSpec(dp=dp_spec(clip_norm=1e30))
  (plain, _), (private, metrics) = run(ChannelSpec()), run(channel)
  chex.assert_trees_all_equal(private.params, plain.params)
  chex.assert_trees_all_equal(private.opt_state, plain.opt_state)
  assert float(metrics["dp/clipped_fraction"]) == 0.0
  assert float(metrics["dp/noise_std"]) == 0.0


def test_poisson_sampling_lanes_distinct_clients_and_inclusion_rate():
  data = uneven_clients()  # 6 clients
  q = 0.3
  spec = FLSpec(clients_per_round=2, channel=ChannelSpec(dp=dp_spec(
      sampling="poisson", sampling_rate=q, num_clients=6, expected_clients=6 * q)))
  lanes = accountant.poisson_lanes(6, q)
  rounds = 4000
  keys = jax.random.split(jax.random.PRNGKey(7), rounds)

  def sample_one(key):
    sampled = select_clients(key, data, {}, spec)
    return sampled.ids, sampled.real, sampled.left_out

  sample = jax.jit(jax.vmap(sample_one))
  ids, real, left_out = (np.asarray(a) for a in sample(keys))
  assert ids.shape == (rounds, lanes) and lanes == 6  # P(Bin(7, 0.3) > 6) > 1e-12: all 6
  np.testing.assert_array_equal(real, ids >= 0)
  assert not left_out.any()
  for row in ids[:200]:
    chosen = row[row >= 0]
    assert len(set(chosen.tolist())) == len(chosen)
    assert list(row[: len(chosen)]) == list(chosen)  # padding lanes last
  rate = np.stack([(ids == n).any(axis=1) for n in range(6)]).mean(axis=1)
  np.testing.assert_allclose(rate, q, atol=5 * math.sqrt(q * (1 - q) / rounds))
  # Padding lanes have no examples; fixed-size sampling is what it always was.
  fixed = select_clients(keys[0], data, {}, FLSpec(clients_per_round=2))
  np.testing.assert_array_equal(fixed.ids, sample_clients(keys[0], 6, 2))
  assert fixed.left_out is None


def test_poisson_lanes_leave_out_the_overflow():
  n, q = 1000, 0.05
  lanes = accountant.poisson_lanes(n, q)
  assert 50 < lanes <= 110  # K̄ = 50: a 10⁻¹² tail is 8 std above the mean
  assert accountant.overflow_probability(accountant.Mechanism(
      1.0, "poisson", q, n, n * q)) <= accountant.OVERFLOW_PROBABILITY
  # Forced to 40 lanes, the ~50 joiners overflow: the lanes hold 40 of them, the rest counted.
  ids, left_out = jax.jit(poisson_sample, static_argnums=(1, 2, 3))(
      jax.random.PRNGKey(1), n, q, 40)
  u = jax.random.uniform(jax.random.PRNGKey(1), (n,))
  joined = int(jnp.sum(u < q))
  assert joined > 40 and int(left_out) == joined - 40
  assert bool(jnp.all(ids >= 0)) and len(set(np.asarray(ids).tolist())) == 40
  assert bool(jnp.all(u[ids] < q))
