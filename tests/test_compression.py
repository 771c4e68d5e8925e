"""Compressed uplinks (isr_jax.fl.channel.compression): QSGD, top-k, error feedback, bytes."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import small_setup, uneven_clients

from isr_jax import checkpoint
from isr_jax.config import default_config, validate
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithms.fedper import fedper
from isr_jax.fl.channel.compression import CompressionSpec, compress, leaf_bytes, qsgd, top_k
from isr_jax.fl.channel.spec import ChannelSpec
from isr_jax.fl.personal import personal_predicate
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec

QSGD = CompressionSpec("qsgd", bits=2, fraction=0.01, error_feedback=True)
TOP_K = CompressionSpec("top_k", bits=4, fraction=0.1, error_feedback=True)
# One compiled program per spec instead of an eager dispatch per leaf operation.
jit_compress = jax.jit(compress, static_argnums=3)


def _message(key, scale=1.0):
  """A small message with leaves of several ranks, and an integer leaf."""
  k1, k2, k3 = jax.random.split(key, 3)
  return {"w": scale * jax.random.normal(k1, (7, 5)), "b": scale * jax.random.normal(k2, (10,)),
          "s": scale * jax.random.normal(k3, ()), "count": jnp.arange(3, dtype=jnp.int32)}


# ------------------------------------------------------------------------------ QSGD


def test_qsgd_is_unbiased_within_lemma_3_1_and_on_its_grid():
  bits, n, draws = 2, 64, 4000
  s = 2 ** bits - 1
  v = jax.random.normal(jax.random.PRNGKey(0), (n,))
  keys = jax.random.split(jax.random.PRNGKey(1), draws)
  q = jax.jit(jax.vmap(lambda k: qsgd(k, v, bits)))(keys)
  norm_sq = float(jnp.sum(v ** 2))
  # Lemma 3.1: E‖Q(v) − v‖² ≤ min(n/s², √n/s) ‖v‖², so the mean of N draws has
  # E‖mean − v‖² ≤ bound/N; by Markov, 20× that fails with probability ≤ 5 %,
  # and the keys are fixed.
  bound = min(n / s ** 2, math.sqrt(n) / s) * norm_sq
  assert float(jnp.mean(jnp.sum((q - v) ** 2, axis=1))) <= bound
  assert float(jnp.sum((jnp.mean(q, axis=0) - v) ** 2)) <= 20 * bound / draws
  # Every value is ‖v‖·sign(v_j)·ξ/s with an integer level ξ ∈ [0, s].
  levels = np.asarray(q) * s / math.sqrt(norm_sq)
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
  assert np.all(np.abs(np.round(levels)) <= s)
  assert np.all(np.asarray(q) * np.asarray(v)[None] >= 0)  # never the wrong sign


def test_qsgd_buckets_each_have_their_own_norm_and_grid():
  bits, bucket = 2, 16
  s = 2 ** bits - 1
  # Buckets of very different scales, and a last bucket of 4 (70 = 4·16 + 6 values).
  v = jax.random.normal(jax.random.PRNGKey(2), (70,)) * jnp.repeat(
      jnp.asarray([1e-3, 1.0, 10.0, 0.1, 5.0]), jnp.asarray([16, 16, 16, 16, 6]))
  keys = jax.random.split(jax.random.PRNGKey(3), 2000)
  q = np.asarray(jax.jit(jax.vmap(lambda k: qsgd(k, v, bits, bucket)))(keys))
  for start in range(0, 70, bucket):
    part, got = np.asarray(v[start:start + bucket]), q[:, start:start + bucket]
    norm = np.sqrt(np.sum(part ** 2))
    levels = got * s / norm
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # its own grid
    bound = min(part.size / s ** 2, math.sqrt(part.size) / s) * norm ** 2
    assert np.sum((got.mean(axis=0) - part) ** 2) <= 20 * bound / len(keys)  # unbiased
  # The small bucket is quantized on its own scale: one norm for all would round it to 0.
  assert np.any(q[:, :16] != 0)
  assert leaf_bytes(jax.ShapeDtypeStruct((70,), jnp.float32), QSGD._replace(bucket_size=bucket)) \
      == 4 * 5 + math.ceil(70 * 3 / 8)


def test_qsgd_of_zero_is_zero():
  chex.assert_trees_all_equal(qsgd(jax.random.PRNGKey(0), jnp.zeros((5,)), 4), jnp.zeros((5,)))


# ----------------------------------------------------------------------------- top-k


def test_top_k_keeps_exactly_k_largest_per_leaf():
  message = _message(jax.random.PRNGKey(2))
  sent, residual = jit_compress(jax.random.PRNGKey(3), message, None, TOP_K._replace(
      error_feedback=False))
  assert residual is None
  chex.assert_trees_all_equal(sent["count"], message["count"])  # integers travel as they are
  for name, k in [("w", 4), ("b", 1), ("s", 1)]:  # ⌈0.1·35⌉, ⌈0.1·10⌉, max(1, ⌈0.1⌉)
    v, c = np.asarray(message[name]).ravel(), np.asarray(sent[name]).ravel()
    kept = c != 0
    assert kept.sum() == k, name
    np.testing.assert_array_equal(c[kept], v[kept])
    if k < v.size:
      assert np.abs(v[kept]).min() >= np.abs(v[~kept]).max()
  np.testing.assert_array_equal(top_k(jnp.ones((4,)), 1.0), jnp.ones((4,)))


# -------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", [QSGD, TOP_K], ids=["qsgd", "top_k"])
def test_error_feedback_keeps_what_was_not_sent(spec):
  message = _message(jax.random.PRNGKey(4))
  old = jax.tree.map(jnp.zeros_like, message)
  old = {**old, "w": 0.3 * jax.random.normal(jax.random.PRNGKey(5), (7, 5))}
  sent, new = jit_compress(jax.random.PRNGKey(6), message, old, spec)
  # sent + e⁺ = m + e: exact for top-k (a value is sent or kept), to rounding for QSGD.
  total = jax.tree.map(jnp.add, sent, new)
  want = jax.tree.map(jnp.add, message, old)
  if spec.method == "top_k":
    chex.assert_trees_all_equal(total, want)
  else:
    chex.assert_trees_all_close(total, want, atol=1e-6, rtol=1e-6)
  chex.assert_trees_all_equal(new["count"], old["count"])


def test_error_feedback_sends_a_constant_message_in_full_on_average():
  m = jax.random.normal(jax.random.PRNGKey(7), (20,))  # top-k sends 2 of 20 a round
  spec, rounds = TOP_K, 200

  def run(error_feedback):
    def one(e, key):
      sent, e = compress(key, m, e, spec._replace(error_feedback=error_feedback))
      return e, sent

    e0 = jnp.zeros_like(m) if error_feedback else None
    _, sent = jax.lax.scan(one, e0, jax.random.split(jax.random.PRNGKey(8), rounds))
    return jnp.mean(sent, axis=0)

  # Σ_t sent_t = T·m − e_T, and e_T stays bounded: the mean tends to m.
  with_ef, without = jax.jit(run, static_argnums=0)(True), jax.jit(run, static_argnums=0)(False)
  assert float(jnp.linalg.norm(with_ef - m)) < 0.1 * float(jnp.linalg.norm(m))
  # Without it, the same 2 coordinates every round: most of m never arrives.
  assert float(jnp.linalg.norm(without - m)) > 0.5 * float(jnp.linalg.norm(m))


# ----------------------------------------------------------------------------- bytes


def test_leaf_bytes_by_hand():
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  assert leaf_bytes(f32(100), QSGD._replace(bits=4)) == 4 + 63  # ⌈100·5/8⌉ = ⌈62.5⌉
  assert leaf_bytes(f32(10, 10), QSGD) == 4 + 38  # ⌈100·3/8⌉ = ⌈37.5⌉
  assert leaf_bytes(jax.ShapeDtypeStruct((8,), jnp.bfloat16), QSGD) == 4 + 3
  assert leaf_bytes(f32(10, 10), TOP_K._replace(fraction=0.05)) == 5 * 8
  assert leaf_bytes(f32(100), TOP_K._replace(fraction=0.07)) == 7 * 8  # not ⌈7.000…01⌉ = 8
  assert leaf_bytes(f32(), TOP_K) == 8  # k ≥ 1
  assert leaf_bytes(jax.ShapeDtypeStruct((3,), jnp.int32), TOP_K) == 12  # raw


# ------------------------------------------------------ one compressed round, resumed


@pytest.fixture(scope="module")
def compressed_rounds():
  """FedPer (the head stays home) with top-k and error feedback: rounds 1 and 2."""
  base, fns, _ = small_setup(isr=False)
  data = uneven_clients()
  spec = FLSpec(clients_per_round=3, local_epochs=1, channel=ChannelSpec(compression=TOP_K))
  built = make_round(fedper(), fns.problem, spec, local_optimizer=fns.local_optimizer,
                     local_lr=fns.local_lr, server_optimizer=fns.server_optimizer)
  # Committed to the device as a restored state is, so that round 2 from either
  # state runs the one compiled round (jit keys its cache on commitment too).
  device = jax.devices()[0]
  state0 = jax.device_put(built.init(base.params, data, jax.random.PRNGKey(3)), device)
  data = jax.device_put(data, device)
  step = built.jit()
  state1, metrics1 = step(state0, data)
  state2, _ = step(state1, data)
  return dict(step=step, data=data, state0=state0, state1=state1, metrics1=metrics1,
              state2=state2)


def test_up_bytes_count_the_compressed_travelling_leaves(compressed_rounds):
  state0, metrics = compressed_rounds["state0"], compressed_rounds["metrics1"]
  head = personal_predicate("head")
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(state0.params)]
  body = [x for p, x in leaves if not head(p)]
  assert len(body) < len(leaves)  # the head is left out
  per_client = sum(8 * max(1, math.ceil(0.1 * x.size)) for x in body)
  assert float(metrics["comm/up_bytes"]) == 3 * per_client
  raw = sum(4 * x.size for x in body)
  # A value and its index (4 + 4 bytes) for 10 % of the values: a fifth of the raw bytes.
  assert per_client < 0.21 * raw


def test_residual_lives_in_the_client_state(compressed_rounds):
  residual0 = compressed_rounds["state0"].client_states["channel"]["residual"]
  residual1 = compressed_rounds["state1"].client_states["channel"]["residual"]
  chex.assert_trees_all_equal(residual0, jax.tree.map(jnp.zeros_like, residual0))
  per_client = jax.jit(jax.vmap(lambda r: sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(r))))
  touched = np.asarray(per_client(residual1) > 0)
  assert touched.sum() == 3  # the sampled clients kept what they did not send


def test_resumed_round_equals_the_live_round_bit_for_bit(compressed_rounds, tmp_path):
  state1 = compressed_rounds["state1"]
  manager = checkpoint.checkpoint_manager(str(tmp_path), keep=1)
  try:
    checkpoint.save(manager, 1, state1)
    checkpoint.wait(manager)
    restored = checkpoint.restore_latest(manager, state1)
  finally:
    checkpoint.close(manager)
  chex.assert_trees_all_equal(restored.client_states, state1.client_states)
  resumed, _ = compressed_rounds["step"](restored, compressed_rounds["data"])
  chex.assert_trees_all_equal(resumed, compressed_rounds["state2"])


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("setting, value, message", [
    ("bits", 17, "fl.compression.bits=17 must be in [1, 16]"),
    ("bits", 0, "fl.compression.bits=0 must be in [1, 16]"),
    ("fraction", 0.0, "fl.compression.fraction=0.0 must be in (0, 1]"),
    ("method", "topk", "fl.compression.method='topk' is not one of"),
])
def test_bad_settings_are_one_line(setting, value, message):
  config = default_config()
  config.fl.compression.method = "qsgd"
  config.fl.compression[setting] = value
  with pytest.raises(ConfigError) as error:
    validate(config)
  assert message in str(error.value) and "\n" not in str(error.value)
