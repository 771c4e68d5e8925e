"""Robust aggregation rules: the server's estimate of the clients' mean update that a few
malicious clients cannot move far.

Rules (``fl.robust.rule``), each over the ``n`` real sampled clients' messages
``w_1 … w_n`` (``n`` is known only inside the round: dropouts and the padding
lanes that fill the mesh are left out exactly), with equal weight (one client,
one vote) unless said otherwise:

- ``mean``: the plain round (the algorithm's own example-weighted mean).
- ``median``: coordinate-wise median (Yin, Chen, Ramchandran, Bartlett, ICML
  2018); for even ``n`` the mean of the two middle values.
- ``trimmed_mean``: coordinate-wise mean of the ``n − 2b`` middle values, the
  ``b = ⌊βn⌋`` largest and smallest dropped (Yin et al., ICML 2018).
- ``krum`` / ``multi_krum`` (Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS
  2017): ``score_i = Σ_{j ∈ N_i} ‖w_i − w_j‖²`` over the ``n − f − 2`` real
  ``j ≠ i`` nearest to ``w_i``, distances over the whole message (every leaf
  flattened into one vector); Krum returns the message of lowest score,
  Multi-Krum the mean of the ``m`` lowest (``m = fl.robust.multi_krum``, or
  ``n − f``).
- ``geometric_median``: ``argmin_v Σ_i α_i ‖v − w_i‖`` with ``α_i = |D_i| / Σ|D|``,
  by RFA's smoothed Weiszfeld iterations (Pillutla, Kakade, Harchaoui, IEEE TSP
  2022, Alg. 2) from the weighted mean:
  ``v ← Σ_i β_i w_i / Σ_i β_i``, ``β_i = α_i / max(ν, ‖v − w_i‖)``.

With no real client in the round every rule returns zeros (no update), as the
plain mean does. Integer leaves are aggregated in float32 and cast back.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.config_checks import check_integer, check_number, check_one_of
from isr_jax.errors import ConfigError

DEFAULTS = {
    "rule": "mean",  # median | trimmed_mean | krum | multi_krum | geometric_median
    "trim_fraction": 0.1,  # β of the trimmed mean, from each end
    "byzantine": 1,  # f, the attackers Krum tolerates (needs K > 2f + 2)
    "multi_krum": 0,  # m, clients Multi-Krum averages (0: K − f)
    "geomedian_iterations": 10,  # Weiszfeld steps (RFA uses 3 to 10)
    "geomedian_smoothing": 1e-6,  # ν, keeps the Weiszfeld weights finite
    # The attack simulator (isr_jax.fl.channel.attacks): a fraction of the sampled clients.
    "attack": "none",  # sign_flip | gaussian | label_flip | alie
    "attacker_fraction": 0.0,
    "attack_scale": 1.0,  # sign_flip: −s·Δ; gaussian: N(0, s²) per coordinate
}
RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median")


class RobustSpec(NamedTuple):
  """The rule and its settings (see :data:`DEFAULTS`)."""

  rule: str
  trim_fraction: float
  byzantine: int
  multi_krum: int
  geomedian_iterations: int
  geomedian_smoothing: float


def trimmed_count(trim_fraction: float, n: int) -> int:
  """``b = ⌊βn⌋``, the values the trimmed mean drops from each end among ``n``."""
  # The slack absorbs β's binary rounding (0.35 · 20 = 6.9999…), never a real fraction.
  return math.floor(trim_fraction * n + 1e-9)


def settings(config) -> RobustSpec | None:
  """``config.fl.robust``'s rule checked; ``None`` for ``mean`` (the plain round).

  Krum's ``K > 2f + 2`` is checked against ``fl.clients_per_round``, and a
  trimmed mean that would trim nothing from ``K`` clients is refused.
  """
  r = config.fl.robust
  rule = check_one_of(r.rule, RULES, "fl.robust.rule")
  trim = check_number(r.trim_fraction, "fl.robust.trim_fraction", low=0, high=0.5,
                      high_open=True)
  byzantine = check_integer(r.byzantine, "fl.robust.byzantine", low=0)
  multi_krum = check_integer(r.multi_krum, "fl.robust.multi_krum", low=0)
  iterations = check_integer(r.geomedian_iterations, "fl.robust.geomedian_iterations")
  smoothing = check_number(r.geomedian_smoothing, "fl.robust.geomedian_smoothing", low=0,
                           low_open=True)
  if rule == "mean":
    return None
  k = config.fl.clients_per_round
  if rule in ("krum", "multi_krum") and k <= 2 * byzantine + 2:
    raise ConfigError(
        f"fl.robust.rule={rule!r} with fl.robust.byzantine={byzantine} needs "
        f"fl.clients_per_round > 2f + 2 = {2 * byzantine + 2} (got {k})")
  if rule == "multi_krum" and multi_krum > k - byzantine:
    raise ConfigError(f"fl.robust.multi_krum={multi_krum} must be <= fl.clients_per_round - "
                      f"fl.robust.byzantine = {k - byzantine} (0: that many)")
  if rule == "trimmed_mean" and trim > 0 and trimmed_count(trim, k) == 0:
    raise ConfigError(
        f"fl.robust.trim_fraction={trim} trims ⌊βK⌋ = 0 of fl.clients_per_round={k} clients "
        f"from each end: raise it to at least 1/K = {1 / k:.4g}, or use rule='median'")
  return RobustSpec(rule, trim, byzantine, multi_krum, iterations, smoothing)


def aggregate(messages: Any, weights: jax.Array, real: jax.Array,
              spec: RobustSpec) -> tuple[Any, dict[str, jax.Array]]:
  """The rule's estimate of the mean message, and its metrics.

  Args:
    messages: the stacked messages ``[K, ...]`` in sampling order.
    weights: ``[K]`` ``|D_i| / Σ|D|`` (0 for padding); read by the geometric median
      and by the shift metric only.
    real: ``[K]`` bool, the lanes that hold a real client's message.
    spec: the rule.

  Returns:
    ``(mean, metrics)``: ``mean`` shaped like one message (no leading axis);
    ``robust/shift`` is ``‖mean − Σ_i w_i m_i‖ / ‖Σ_i w_i m_i‖``, how far the rule
    moved the plain round's weighted mean; Krum and Multi-Krum also report
    ``robust/selected``, the clients they averaged.
  """
  real = real.astype(bool)
  n = jnp.sum(real.astype(jnp.int32))
  # Padding lanes become zeros at once, so no value they hold (inf included) can
  # reach a sum, a sort or a distance below.
  rows = jax.tree.map(lambda m: jnp.where(_per_row(real, m), m.astype(jnp.float32), 0.0),
                      messages)
  w = jnp.where(real, weights.astype(jnp.float32), 0.0)
  w = w / jnp.maximum(jnp.sum(w), jnp.finfo(jnp.float32).tiny)
  weighted_mean = jax.tree.map(lambda x: jnp.tensordot(w, x, axes=1), rows)
  metrics: dict[str, jax.Array] = {}
  if spec.rule == "median":
    estimate = jax.tree.map(lambda x: _median(x, real, n), rows)
  elif spec.rule == "trimmed_mean":
    estimate = jax.tree.map(lambda x: _trimmed_mean(x, real, n, spec.trim_fraction), rows)
  elif spec.rule in ("krum", "multi_krum"):
    estimate, selected = _krum(rows, real, n, spec)
    metrics["robust/selected"] = selected
  elif spec.rule == "geometric_median":
    estimate = _geometric_median(rows, w, weighted_mean, spec)
  else:
    raise ValueError(f"no robust rule {spec.rule!r}; one of {RULES[1:]}")
  metrics["robust/shift"] = (
      _norm(jax.tree.map(jnp.subtract, estimate, weighted_mean))
      / jnp.maximum(_norm(weighted_mean), jnp.finfo(jnp.float32).tiny))
  mean = jax.tree.map(lambda e, m: e.astype(m.dtype), estimate, messages)
  return mean, metrics


def _per_row(real: jax.Array, x: jax.Array) -> jax.Array:
  """``real`` shaped to broadcast over the rows of ``x`` ``[K, ...]``."""
  return real.reshape(real.shape + (1,) * (x.ndim - 1))


def _norm(tree: Any) -> jax.Array:
  """``‖tree‖₂`` over every leaf flattened into one vector."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _sorted_real(x: jax.Array, real: jax.Array) -> jax.Array:
  """``x`` sorted along the clients: the ``n`` real values first, padding (+inf) last."""
  return jnp.sort(jnp.where(_per_row(real, x), x, jnp.inf), axis=0)


def _median(x: jax.Array, real: jax.Array, n: jax.Array) -> jax.Array:
  """Coordinate-wise median of the real rows of ``x`` (Yin et al. 2018)."""
  s = _sorted_real(x, real)
  # Odd n: both indices are the middle one; even n: the two middle values.
  lo = lax.dynamic_index_in_dim(s, jnp.maximum((n - 1) // 2, 0), 0, keepdims=False)
  hi = lax.dynamic_index_in_dim(s, n // 2, 0, keepdims=False)
  return jnp.where(n > 0, (lo + hi) / 2, 0.0)


def _trimmed_mean(x: jax.Array, real: jax.Array, n: jax.Array, beta: float) -> jax.Array:
  """Coordinate-wise ``β``-trimmed mean of the real rows of ``x`` (Yin et al. 2018)."""
  k = x.shape[0]
  # ⌊βn⌋ for every n the lanes can hold, computed in Python: exact, static.
  b = jnp.asarray([trimmed_count(beta, i) for i in range(k + 1)], jnp.int32)[n]
  rank = _per_row(jnp.arange(k), x)
  keep = (rank >= b) & (rank < n - b)
  return jnp.sum(jnp.where(keep, _sorted_real(x, real), 0.0), axis=0) / jnp.maximum(n - 2 * b, 1)


def _krum(rows: Any, real: jax.Array, n: jax.Array, spec: RobustSpec) -> tuple[Any, jax.Array]:
  """Krum's or Multi-Krum's estimate (Blanchard et al. 2017) and how many rows it averaged."""
  k = real.shape[0]
  f = spec.byzantine
  dist = _pairwise_squared_distances(rows, real, n)
  others = real[:, None] & real[None, :] & ~jnp.eye(k, dtype=bool)
  nearest = jnp.sort(jnp.where(others, dist, jnp.inf), axis=1)
  # n − f − 2 neighbours; when dropouts leave n ≤ f + 2, the nearest one (the rule's
  # guarantee is gone then, but it still prefers a message with a close neighbour).
  count = jnp.clip(n - f - 2, 1, n - 1)
  scores = jnp.sum(jnp.where(jnp.arange(k)[None, :] < count, nearest, 0.0), axis=1)
  scores = jnp.where(real, scores, jnp.inf)
  if spec.rule == "krum":
    m = jnp.ones((), jnp.int32)
  else:
    m = jnp.asarray(spec.multi_krum, jnp.int32) if spec.multi_krum else n - f
  m = jnp.clip(m, 1, jnp.maximum(n, 1))
  # Stable: equal scores go to the earlier lane.
  rank = jnp.zeros((k,), jnp.int32).at[jnp.argsort(scores, stable=True)].set(jnp.arange(k))
  chosen = real & (rank < m)
  count_chosen = jnp.sum(chosen.astype(jnp.float32))
  estimate = jax.tree.map(
      lambda x: jnp.sum(jnp.where(_per_row(chosen, x), x, 0.0), axis=0)
      / jnp.maximum(count_chosen, 1.0), rows)
  return estimate, count_chosen


def _pairwise_squared_distances(rows: Any, real: jax.Array, n: jax.Array) -> jax.Array:
  """``[K, K]`` ``‖w_i − w_j‖²`` over whole messages, from one Gram matrix per leaf.

  The rows are centred on their real mean first: ``‖a‖² + ‖b‖² − 2a·b`` then
  cancels far less when the messages share a large common part.
  """
  def gram(x):
    mean = jnp.sum(x, axis=0) / jnp.maximum(n, 1)
    c = jnp.where(_per_row(real, x), x - mean, 0.0).reshape(x.shape[0], -1)
    # HIGHEST: TPUs and TF32 GPUs would otherwise multiply in bf16/tf32.
    return jnp.matmul(c, c.T, precision=lax.Precision.HIGHEST)

  g = sum(gram(x) for x in jax.tree.leaves(rows))
  sq = jnp.diagonal(g)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)


def _geometric_median(rows: Any, alpha: jax.Array, start: Any, spec: RobustSpec) -> Any:
  """RFA's smoothed Weiszfeld iterations (Pillutla et al. 2022, Alg. 2) from ``start``."""
  nu = spec.geomedian_smoothing

  def step(_, v):
    dist = jnp.sqrt(sum(
        jnp.sum(jnp.square(x - e).reshape(x.shape[0], -1), axis=1)
        for x, e in zip(jax.tree.leaves(rows), jax.tree.leaves(v), strict=True)))
    beta = alpha / jnp.maximum(nu, dist)  # α_i = 0 on padding: it never pulls
    total = jnp.sum(beta)
    # total = 0 only without a real client; v (zeros) then stays.
    safe = jnp.where(total > 0, total, 1.0)
    return jax.tree.map(
        lambda x, e: jnp.where(total > 0, jnp.tensordot(beta, x, axes=1) / safe, e), rows, v)

  return lax.fori_loop(0, spec.geomedian_iterations, step, start)
