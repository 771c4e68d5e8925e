"""Robust aggregation rules and the attacks they are tested against (isr_jax.fl.channel).

Each rule and attack on toy messages worked out by hand, padding lanes that
change nothing, and one LeNet-5 round under a sign-flip attack.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import small_setup, uneven_clients

from isr_jax.config import default_config, validate
from isr_jax.data.packing import ClientData
from isr_jax.errors import ConfigError
from isr_jax.fl.channel.attacks import (
    AttackSpec,
    alie_z,
    attacker_count,
    attackers,
    corrupt,
    flip_labels,
)
from isr_jax.fl.channel.robust import RobustSpec, aggregate
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec


def rule(name, trim=0.1, byzantine=1, multi_krum=0, iterations=10, smoothing=1e-6):
  return RobustSpec(name, trim, byzantine, multi_krum, iterations, smoothing)


def run(spec, messages, real=None, weights=None):
  """``aggregate`` on numpy messages ``[K, ...]``, every lane real and equal by default."""
  messages = jax.tree.map(jnp.asarray, messages)
  k = jax.tree.leaves(messages)[0].shape[0]
  real = np.ones(k, bool) if real is None else np.asarray(real)
  weights = real / real.sum() if weights is None else np.asarray(weights, np.float32)
  return _aggregate(messages, jnp.asarray(weights, jnp.float32), jnp.asarray(real), spec)


# Jitted: one compilation per shape and rule costs less than eager op-by-op dispatch.
_aggregate = jax.jit(aggregate, static_argnums=3)


# 2-D points: a unit square around (0.5, 0.5), its centre, and an outlier.
SQUARE = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [0.5, 0.5], [10, 10]], np.float32)


def test_median_of_odd_and_even_counts():
  x = np.array([[3, -1], [1, 7], [2, 0], [9, 5], [4, 4]], np.float32)
  mean, _ = run(rule("median"), {"a": x})
  np.testing.assert_array_equal(mean["a"], [3, 4])
  # Even: the mean of the two middle values, per coordinate.
  mean, _ = run(rule("median"), {"a": x[:4]})
  np.testing.assert_array_equal(mean["a"], [2.5, 2.5])


def test_trimmed_mean_drops_floor_beta_n_from_each_end():
  x = np.array([[-100], [1], [2], [3], [4], [5], [6], [7], [8], [100]], np.float32)
  mean, metrics = run(rule("trimmed_mean", trim=0.2), {"a": x})  # b = 2: 2..7 stay
  np.testing.assert_allclose(mean["a"], [4.5])
  # β = 0.25 of 6: ⌊1.5⌋ = 1 from each end.
  mean, _ = run(rule("trimmed_mean", trim=0.25), {"a": x[[0, 1, 2, 3, 4, 9]]})
  np.testing.assert_allclose(mean["a"], [2.5])
  assert set(metrics) == {"robust/shift"}


def test_krum_picks_the_point_closest_to_its_neighbours_and_multi_krum_averages_the_best():
  # f = 1, n = 6: each score sums n − f − 2 = 3 squared distances. The centre's
  # three nearest are corners at 0.5 each (1.5); a corner's are 0.5 + 1 + 1 (2.5).
  mean, metrics = run(rule("krum"), {"p": SQUARE})
  np.testing.assert_allclose(mean["p"], [0.5, 0.5])
  assert float(metrics["robust/selected"]) == 1
  # Multi-Krum, m = n − f = 5: everything but the outlier.
  mean, metrics = run(rule("multi_krum"), {"p": SQUARE})
  np.testing.assert_allclose(mean["p"], [0.5, 0.5], atol=1e-6)
  assert float(metrics["robust/selected"]) == 5
  # The centre moved up to (0.5, 0.6): scores 0.41 + 0.41 + 0.61 = 1.43 (centre),
  # 0.41 + 1 + 1 = 2.41 (upper corners), 0.61 + 1 + 1 = 2.61 (lower corners).
  pts = SQUARE.copy()
  pts[4] = [0.5, 0.6]
  mean, _ = run(rule("multi_krum", multi_krum=3), {"p": pts})
  np.testing.assert_allclose(mean["p"], [(0.5 + 0 + 1) / 3, (0.6 + 1 + 1) / 3], rtol=1e-6)


def multi_krum_reference(points, f, m):
  """Blanchard et al.'s Multi-Krum by brute force on rows ``[n, d]``."""
  n = len(points)
  d = ((points[:, None] - points[None]) ** 2).sum(-1)
  scores = [np.sort(np.delete(d[i], i))[:n - f - 2].sum() for i in range(n)]
  return points[np.argsort(scores, kind="stable")[:m]].mean(0)


def test_krum_measures_distance_over_the_whole_message():
  # Per leaf the outlier would look close in "a"; over both leaves it is far.
  rng = np.random.default_rng(0)
  tree = {"a": rng.normal(size=(7, 3)).astype(np.float32),
          "b": rng.normal(size=(7, 2, 2)).astype(np.float32)}
  tree["b"][3] += 20
  flat = np.concatenate([tree["a"], tree["b"].reshape(7, -1)], 1)
  mean, _ = run(rule("multi_krum", byzantine=2, multi_krum=3), tree)
  want = multi_krum_reference(flat, f=2, m=3)
  got = np.concatenate([mean["a"], mean["b"].reshape(-1)])
  np.testing.assert_allclose(got, want, atol=1e-5)


def weiszfeld_reference(points, weights, iterations=2000, nu=1e-12):
  """The geometric median by many float64 Weiszfeld steps."""
  v = weights @ points / weights.sum()
  for _ in range(iterations):
    beta = weights / np.maximum(nu, np.linalg.norm(points - v, axis=1))
    v = beta @ points / beta.sum()
  return v


def test_geometric_median():
  # Symmetric points: the centre (one of them, where the smoothing ν keeps β finite).
  centre = np.array([2.0, -1.0], np.float32)
  pts = centre + np.array([[1, 0], [-1, 0], [0, 3], [0, -3], [0, 0]], np.float32)
  mean, _ = run(rule("geometric_median"), {"p": pts})
  np.testing.assert_allclose(mean["p"], centre, atol=1e-6)
  # Uneven weights and an outlier: RFA's 100 steps reach the converged median.
  rng = np.random.default_rng(1)
  pts = rng.normal(size=(8, 5))
  pts[2] += 50
  w = rng.uniform(1, 5, size=8)
  w /= w.sum()
  mean, _ = run(rule("geometric_median", iterations=100),
                {"a": pts[:, :2].astype(np.float32), "b": pts[:, 2:].astype(np.float32)},
                weights=w)
  want = weiszfeld_reference(pts, w)
  np.testing.assert_allclose(np.concatenate([mean["a"], mean["b"]]), want, atol=1e-4)
  assert np.linalg.norm(want - w @ pts) > 3  # the weighted mean is pulled far away


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multi_krum",
                                  "geometric_median"])
def test_padding_lanes_change_nothing(name):
  rng = np.random.default_rng(2)
  tree = {"a": rng.normal(size=(7, 4)).astype(np.float32),
          "b": rng.normal(size=(7, 3)).astype(np.float32)}
  sizes = rng.uniform(1, 4, size=7)
  spec = rule(name, trim=0.15)
  want, want_metrics = run(spec, tree, weights=sizes / sizes.sum())
  # A dropout's lane in the middle and padding lanes at the end, holding garbage.
  lanes = [0, 1, 2, -1, 3, 4, 5, 6, -1, -1]
  real = np.array([i >= 0 for i in lanes])
  garbage = {"a": np.array([1e30, np.inf, np.nan, -1e30], np.float32),
             "b": np.array([-np.inf, 1e30, np.nan], np.float32)}
  padded = jax.tree.map(lambda x, g: np.stack([x[i] if i >= 0 else g for i in lanes]),
                        tree, garbage)
  w = np.array([sizes[i] if i >= 0 else 0 for i in lanes]) / sizes.sum()
  got, got_metrics = run(spec, padded, real=real, weights=w)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=1e-5, atol=1e-6)


def test_no_real_client_gives_zeros():
  x = {"a": np.full((4, 3), 7.0, np.float32)}
  for name in ("median", "trimmed_mean", "krum", "geometric_median"):
    mean, _ = run(rule(name), x, real=np.zeros(4, bool), weights=np.zeros(4))
    np.testing.assert_array_equal(mean["a"], np.zeros(3))


def test_attackers_are_the_first_real_lanes_in_sampling_order():
  real = jnp.array([True, True, False, True, True, True, False, False])  # n = 5
  spec = AttackSpec("sign_flip", 0.4, 1.0, 0)  # round(2.0) = 2
  np.testing.assert_array_equal(attackers(real, spec), [1, 1, 0, 0, 0, 0, 0, 0])
  # round(2.5) = 3 (half up), skipping the dropout's lane.
  spec = spec._replace(fraction=0.5)
  np.testing.assert_array_equal(attackers(real, spec), [1, 1, 0, 1, 0, 0, 0, 0])
  assert [attacker_count(0.15, 10), attacker_count(0.3, 10), attacker_count(0.05, 9)] == [2, 3, 0]


def toy_messages():
  rng = np.random.default_rng(3)
  return {"delta": jnp.asarray(rng.normal(size=(6, 2000)), jnp.float32),
          "count": jnp.arange(6, dtype=jnp.int32)}


ATTACKING = jnp.array([True, True, False, False, False, False])
REAL = jnp.array([True, True, True, True, True, False])


def assert_honest_rows_untouched(sent, messages):
  for key in messages:
    np.testing.assert_array_equal(np.asarray(sent[key])[2:], np.asarray(messages[key])[2:])
  np.testing.assert_array_equal(sent["count"], messages["count"])  # integer leaves never change


def test_sign_flip_and_gaussian_attacks():
  m = toy_messages()
  sent = corrupt(jax.random.PRNGKey(0), m, ATTACKING, REAL, AttackSpec("sign_flip", 0.4, 3.0, 0))
  np.testing.assert_array_equal(sent["delta"][:2], -3.0 * m["delta"][:2])
  assert_honest_rows_untouched(sent, m)
  sent = corrupt(jax.random.PRNGKey(0), m, ATTACKING, REAL, AttackSpec("gaussian", 0.4, 3.0, 0))
  noise = np.asarray(sent["delta"][:2])
  assert abs(noise.std() - 3.0) < 0.1 and abs(noise.mean()) < 0.1
  assert not np.allclose(noise[0], noise[1])  # each attacker its own draw
  assert_honest_rows_untouched(sent, m)
  sent = corrupt(jax.random.PRNGKey(0), m, ATTACKING, REAL, AttackSpec("label_flip", 0.4, 1, 10))
  assert sent is m


def test_alie_sends_mean_minus_z_max_std_of_the_honest_clients():
  # Baruch et al.: n = 10, f = 2: s = ⌊10/2 + 1⌋ − 2 = 4, z = Φ⁻¹(6/10) = 0.2533.
  assert float(alie_z(10, 2)) == pytest.approx(0.2533471, abs=1e-6)
  # n = 5, f = 2: s = 1, z = Φ⁻¹(4/5) = 0.8416; attackers in the majority keep s = 1.
  assert float(alie_z(5, 2)) == pytest.approx(0.8416212, abs=1e-6)
  assert float(alie_z(5, 4)) == float(alie_z(5, 2))
  m = toy_messages()
  sent = corrupt(jax.random.PRNGKey(0), m, ATTACKING, REAL, AttackSpec("alie", 0.4, 1.0, 0))
  honest = np.asarray(m["delta"], np.float64)[2:5]
  want = honest.mean(0) - float(alie_z(5, 2)) * honest.std(0)
  for row in (0, 1):
    np.testing.assert_allclose(sent["delta"][row], want, atol=1e-5)
  assert_honest_rows_untouched(sent, m)


def test_flip_labels_maps_y_to_c_minus_1_minus_y_for_the_attackers_only():
  attacker = jnp.array([True, False])
  spec = AttackSpec("label_flip", 0.5, 1.0, 10)
  y = jnp.array([[[0, 3, 9]], [[0, 3, 9]]], jnp.int32)  # [C=2, S=1, B=3]
  data = ClientData(jnp.zeros(y.shape + (4,)), y, jnp.ones(y.shape, bool), jnp.array([3, 3]))
  np.testing.assert_array_equal(flip_labels(data, attacker, spec).y,
                                [[[9, 6, 0]], [[0, 3, 9]]])
  # Dense labels [C, S, B, H, W]: the ignore index 255 stays.
  dense = jnp.array([[0, 255], [4, 1]], jnp.uint8)[None, None, None].repeat(2, 0)
  data = data._replace(y=dense)
  flipped = flip_labels(data, attacker, spec).y
  assert flipped.dtype == jnp.uint8
  np.testing.assert_array_equal(flipped[0, 0, 0], [[9, 255], [5, 8]])
  np.testing.assert_array_equal(flipped[1], dense[1])


@pytest.mark.parametrize("settings,match", [
    (dict(rule="krum", byzantine=4), r"clients_per_round > 2f \+ 2 = 10 \(got 10\)"),
    (dict(rule="multi_krum", multi_krum=10), r"multi_krum=10 must be <= .* = 9"),
    (dict(rule="trimmed_mean", trim_fraction=0.05), r"trims ⌊βK⌋ = 0"),
    (dict(attack="sign_flip", attacker_fraction=0.04), r"rounds to 0 attackers"),
])
def test_settings_refused_in_one_line(settings, match):
  config = default_config()  # clients_per_round = 10
  config.fl.robust.update(settings)
  with pytest.raises(ConfigError, match=match) as error:
    validate(config)
  assert "\n" not in str(error.value)


# One round of 6 LeNet-5 clients, 2 of which send −100·Δ, averaged by the plain mean
# and by the coordinate-wise median. Both rounds sample, train and attack alike.
ATTACK = AttackSpec("sign_flip", 1 / 3, 100.0, 10)


@pytest.fixture(scope="module")
def attacked_rounds():
  data = uneven_clients()
  state, fns, _ = small_setup(isr=False)

  def one(robust):
    spec = FLSpec(clients_per_round=6, channel=ChannelSpec(robust=robust, attack=ATTACK))
    return jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)

  return state, one(None), one(rule("median"))


def test_median_round_resists_sign_flip_attackers_that_drag_the_mean(attacked_rounds):
  start, (mean_state, mean_metrics), (median_state, metrics) = attacked_rounds
  flat = lambda s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(s.params)])
  mean_step = flat(mean_state) - flat(start)  # server SGD at 1: θ_1 − θ_0 is the aggregate
  median_step = flat(median_state) - flat(start)
  assert float(mean_metrics["attack/attackers"]) == float(metrics["attack/attackers"]) == 2
  chex.assert_tree_all_finite(median_state.params)
  assert np.linalg.norm(median_step) < 0.25 * np.linalg.norm(mean_step)
  # The rule's shift is measured against the very mean the plain round applied.
  assert float(metrics["robust/shift"]) == pytest.approx(
      np.linalg.norm(median_step - mean_step) / np.linalg.norm(mean_step), rel=1e-3)
