"""Loss terms of Eq. 2–5 against hand-computed values and a NumPy reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from isr_jax.adapters import apply_adapter, init_adapters
from isr_jax.errors import ConfigError
from isr_jax.losses import cross_entropy, isr_loss, mi_loss, negative_entropy
from isr_jax.taps import ISRSpec, TapTerm


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_cross_entropy(logits, labels, mask=None, ignore_index=None):
  """Independent reference: explicit loops over positions."""
  lp = np_log_softmax(logits)
  labels = np.asarray(labels)
  b = labels.shape[0]
  total, count = 0.0, 0
  for i in range(b):
    if mask is not None and not mask[i]:
      continue
    for pos in np.ndindex(labels.shape[1:]):
      y = labels[(i, *pos)]
      if ignore_index is not None and y == ignore_index:
        continue
      total -= lp[(i, *pos, y)]
      count += 1
  return total / max(count, 1)


def np_negative_entropy(z, mask=None):
  lp = np_log_softmax(z)
  ne = (np.exp(lp) * lp).sum(-1)  # [B, ...positions]
  if mask is not None:
    ne = ne[np.asarray(mask)]
  return ne.mean()


def test_cross_entropy_hand_computed():
  # logits [0, ln 3] -> softmax [1/4, 3/4]; labels 1 and 0.
  logits = jnp.array([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
  labels = jnp.array([1, 0])
  expected = (-math.log(0.75) - math.log(0.25)) / 2
  np.testing.assert_allclose(cross_entropy(logits, labels), expected, rtol=1e-6)
  # Masking the second example leaves only −log(3/4).
  np.testing.assert_allclose(
      cross_entropy(logits, labels, mask=jnp.array([True, False])), -math.log(0.75), rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6, 5)])
def test_cross_entropy_matches_reference_with_mask_and_ignore(shape):
  rng = np.random.default_rng(0)
  k = shape[-1]
  logits = rng.normal(size=shape).astype(np.float32) * 3
  labels = rng.integers(0, k, size=shape[:-1])
  mask = np.array([True] * (shape[0] - 1) + [False])
  ignore = None
  if len(shape) > 2:
    labels[0, 0, :3] = 255
    ignore = 255
  got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), mask=jnp.asarray(mask),
                      ignore_index=ignore)
  want = np_cross_entropy(logits, labels, mask, ignore)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_cross_entropy_all_ignored_is_zero_not_nan():
  logits = jnp.ones((2, 3, 3, 4))
  labels = jnp.full((2, 3, 3), 255)
  assert float(cross_entropy(logits, labels, ignore_index=255)) == 0.0


@pytest.mark.parametrize("c", [2, 7, 64])
def test_negative_entropy_of_uniform_feature_is_minus_log_c(c):
  z = jnp.zeros((3, 5, 5, c))  # softmax over channels is uniform at every position
  np.testing.assert_allclose(negative_entropy(z), -math.log(c), rtol=1e-6)
  np.testing.assert_allclose(negative_entropy(z, normalize=True), -1.0, rtol=1e-6)


def test_negative_entropy_hand_computed_and_range():
  # One position, s = [1/4, 3/4]: Σ s log s = 1/4 log 1/4 + 3/4 log 3/4.
  z = jnp.array([[0.0, math.log(3.0)]])
  expected = 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
  np.testing.assert_allclose(negative_entropy(z), expected, rtol=1e-6)
  peaked = jnp.array([[100.0, 0.0, 0.0]])
  assert -math.log(3) <= float(negative_entropy(peaked)) <= 0.0
  np.testing.assert_allclose(negative_entropy(peaked), 0.0, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 6), (4, 3, 6), (4, 3, 5, 6)])
def test_negative_entropy_matches_reference(shape):
  rng = np.random.default_rng(1)
  z = rng.normal(size=shape).astype(np.float32)
  mask = np.array([True, True, False, True])
  np.testing.assert_allclose(negative_entropy(jnp.asarray(z), mask=jnp.asarray(mask)),
                             np_negative_entropy(z, mask), rtol=1e-5)


def test_negative_entropy_gradient_matches_autodiff_of_the_formula():
  # The hand-written backward s_j (log s_j − ne) against autodiff of Eq. 4 itself.
  def plain(z):
    log_s = jax.nn.log_softmax(z, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_s) * log_s, axis=-1))

  z = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3, 5, 6)).astype(np.float32))
  np.testing.assert_allclose(jax.grad(negative_entropy)(z), jax.grad(plain)(z),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(negative_entropy(z), plain(z), rtol=1e-6)
  check_grads(negative_entropy, (z,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_classification_adapter_is_gap_then_dense():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  params = {"kernel": rng.normal(size=(4, 5)).astype(np.float32),
            "bias": rng.normal(size=(5,)).astype(np.float32)}
  want = z.mean(axis=(1, 2)) @ params["kernel"] + params["bias"]
  np.testing.assert_allclose(apply_adapter(params, jnp.asarray(z), ()), want, rtol=1e-5)
  labels = np.array([1, 4])
  np.testing.assert_allclose(
      mi_loss(params, jnp.asarray(z), jnp.asarray(labels)),
      np_cross_entropy(want, labels), rtol=1e-5)


def test_dense_adapter_is_1x1_conv_then_bilinear_resize():
  rng = np.random.default_rng(3)
  z = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  params = {"kernel": rng.normal(size=(3, 5)).astype(np.float32), "bias": np.zeros(5, np.float32)}
  q = apply_adapter(params, jnp.asarray(z), (8, 8))
  assert q.shape == (2, 8, 8, 5)
  # Bilinear resize of a constant map is the same constant; and resize commutes
  # with the (linear) 1×1 conv.
  want = jax.image.resize(jnp.asarray(z), (2, 8, 8, 3), "bilinear") @ params["kernel"]
  np.testing.assert_allclose(q, want, rtol=1e-4, atol=1e-5)
  labels = rng.integers(0, 5, size=(2, 8, 8))
  labels[1, :2] = 255
  np.testing.assert_allclose(
      mi_loss(params, jnp.asarray(z), jnp.asarray(labels), ignore_index=255),
      np_cross_entropy(np.asarray(q), labels, None, 255), rtol=1e-5)


def _features():
  rng = np.random.default_rng(4)
  taps = {"a": jnp.asarray(rng.normal(size=(4, 6, 6, 8)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)}
  logits = jnp.asarray(rng.normal(size=(4, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=4))
  adapters = init_adapters(jax.random.PRNGKey(0), {"a": 8, "b": 16}, 10)
  return logits, taps, labels, adapters


def test_isr_loss_is_eq5_sum_of_terms():
  logits, taps, labels, adapters = _features()
  spec = ISRSpec((TapTerm("a", 0.3, 0.02), TapTerm("b", 0.7, 0.5)), ne_normalize=False)
  total, aux = isr_loss(logits, taps, labels, adapters, spec)
  want = (cross_entropy(logits, labels)
          + 0.3 * mi_loss(adapters["a"], taps["a"], labels)
          + 0.02 * negative_entropy(taps["a"])
          + 0.7 * mi_loss(adapters["b"], taps["b"], labels)
          + 0.5 * negative_entropy(taps["b"]))
  np.testing.assert_allclose(total, want, rtol=1e-6)
  assert set(aux) == {"ce", "mi/a", "ne/a", "mi/b", "ne/b", "mi_accuracy/a", "mi_accuracy/b",
                      "total"}
  np.testing.assert_allclose(aux["total"], total)


def test_isr_off_is_exactly_cross_entropy():
  logits, taps, labels, adapters = _features()
  ce = cross_entropy(logits, labels)
  off, aux = isr_loss(logits, taps, labels, {}, None)
  assert float(off) == float(ce)
  zero = ISRSpec((TapTerm("a", 0.0, 0.0),))
  assert float(isr_loss(logits, taps, labels, adapters, zero)[0]) == float(ce)
  assert set(aux) == {"ce", "total"}


def test_gradients_reach_adapters_and_every_tap_term():
  logits, taps, labels, adapters = _features()
  spec = ISRSpec((TapTerm("a", 0.5, 0.1), TapTerm("b", 0.5, 0.0)))

  def loss(adapters, taps):
    return isr_loss(logits, taps, labels, adapters, spec)

  (_, aux), (g_adapters, g_taps) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      adapters, taps)
  for name in ("a", "b"):
    assert float(jnp.abs(g_adapters[name]["kernel"]).sum()) > 0
    assert float(jnp.abs(g_adapters[name]["bias"]).sum()) > 0
    assert float(jnp.abs(g_taps[name]).sum()) > 0
  chex.assert_trees_all_equal_shapes(g_adapters, adapters)
  assert "ne/b" not in aux  # λ = 0: the term is not computed at all


def test_unknown_tap_is_a_config_error():
  logits, taps, labels, adapters = _features()
  with pytest.raises(ConfigError, match="'nope'.*available"):
    isr_loss(logits, taps, labels, adapters, ISRSpec((TapTerm("nope", 1.0, 0.0),)))


def test_per_pixel_weights_scale_terms_but_not_the_count():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, size=(2, 3, 3)))
  weight = jnp.asarray(rng.uniform(0.5, 2.0, size=(2, 3, 3)), jnp.float32)
  lp = np_log_softmax(logits)
  nll = -np.take_along_axis(lp, np.asarray(labels)[..., None], -1)[..., 0]
  np.testing.assert_allclose(cross_entropy(logits, labels, weight=weight),
                             (nll * np.asarray(weight)).mean(), rtol=1e-5)
  # On a coarser tap, NE uses each example's mean pixel weight.
  z = jnp.asarray(rng.normal(size=(2, 1, 1, 5)), jnp.float32)
  per_example = np.asarray(weight).reshape(2, -1).mean(axis=1)
  ne = (np.exp(np_log_softmax(z)) * np_log_softmax(z)).sum(-1).reshape(2)
  np.testing.assert_allclose(negative_entropy(z, weight=weight), (ne * per_example).mean(),
                             rtol=1e-5)
