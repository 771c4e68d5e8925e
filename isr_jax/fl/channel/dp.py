"""Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

Each sampled client's update ``Δ_i`` (its whole message, every leaf that
travels) is clipped to norm ``C``; the server adds ``N(0, (zC)² I)`` to the sum
and divides by the expected number of clients ``K̄`` (``fl.clients_per_round``
under fixed-size sampling, ``qN`` under Poisson sampling):

``Δ̃ = (Σ_i Δ_i · min(1, C / ‖Δ_i‖) + N(0, z²C² I)) / K̄``.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, Alg. 1):
each client also reports ``b_i = 1[‖Δ_i‖ ≤ C]``; the server privatizes their
mean, ``b̃ = (Σ b_i + N(0, σ_b²)) / K̄``, and steps ``C ← C · exp(−η_C (b̃ − γ))``
towards the ``γ``-quantile of the update norms. The two releases share the
budget: the update's noise multiplier is ``z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)`` so the
pair costs what one Gaussian mechanism of multiplier ``z`` costs (their Thm. 1).
As in their implementation (TF Privacy's ``QuantileEstimatorQuery``) the count is
of ``b_i − ½``, whose sum moves by at most ``½`` when one client comes or goes,
the sensitivity that split assumes: ``b̃ = (Σ_i (b_i − ½) + N(0, σ_b²)) / K̄ + ½``,
the formula above whenever ``K̄`` clients took part.

Under Poisson sampling (``fl.dp.sampling='poisson'``) each client joins a round
independently with probability ``q``; the round has a static number of lanes
``L`` (:func:`~isr_jax.fl.channel.accountant.poisson_lanes`), so many that more
than ``L`` join with probability at most ``10⁻¹²`` a round; the accountant
charges that chance to ``δ``.

The noise multiplier comes from ``fl.dp.noise_multiplier``, or, when
``fl.dp.target_epsilon > 0``, is calibrated by :mod:`isr_jax.fl.channel.accountant`
so that ``num_rounds`` rounds spend ``(ε, δ)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_flag, check_number, check_one_of
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import weighted_sum
from isr_jax.fl.channel import accountant

DEFAULTS = {
    "enabled": False,
    "clip_norm": 1.0,  # C (the starting C under adaptive clipping)
    "noise_multiplier": 1.0,  # z: noise std zC on the clipped sum (unless target_epsilon)
    "target_epsilon": 0.0,  # > 0: z calibrated so num_rounds rounds spend (ε, delta)
    "delta": 1e-5,
    "adaptive_clipping": False,  # Andrew et al. 2021
    "target_quantile": 0.5,  # γ: the update-norm quantile C tracks
    "clip_learning_rate": 0.2,  # η_C (their geometric step)
    "count_noise_std": 0.0,  # σ_b, the noise std on the count Σ b_i; 0: K̄/20 (their choice)
    "accountant": "rdp",  # or "pld"
    "sampling": "fixed",  # fixed-size sampling without replacement, or "poisson"
}
ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")


class DPSpec(NamedTuple):
  """The run's DP settings, every derived number resolved (static under jit).

  Attributes:
    clip_norm: ``C`` (the starting value under adaptive clipping).
    noise_multiplier: ``z``, the Gaussian mechanism's multiplier the accountant
      composes (given, or calibrated from ``target_epsilon``).
    update_noise_multiplier: ``z_Δ``, the multiplier of the noise on the update
      sum (``z`` without adaptive clipping).
    delta: ``δ``.
    adaptive: adaptive clipping on.
    target_quantile: ``γ``.
    clip_learning_rate: ``η_C``.
    count_noise_std: ``σ_b``.
    expected_clients: ``K̄``, the divisor of the noisy sum.
    sampling: ``fixed`` or ``poisson``.
    sampling_rate: ``q = K̄ / N``.
    num_clients: ``N``.
    accountant: ``rdp`` or ``pld``.
    target_epsilon: the ``ε`` the noise was calibrated for (0: none).
  """

  clip_norm: float
  noise_multiplier: float
  update_noise_multiplier: float
  delta: float
  adaptive: bool
  target_quantile: float
  clip_learning_rate: float
  count_noise_std: float
  expected_clients: float
  sampling: str
  sampling_rate: float
  num_clients: int
  accountant: str
  target_epsilon: float


def settings(config) -> DPSpec | None:
  """``config.fl.dp`` checked and resolved; ``None`` when DP is off."""
  d = config.fl.dp
  enabled = check_flag(d.enabled, "fl.dp.enabled")
  clip = check_number(d.clip_norm, "fl.dp.clip_norm", low=0, low_open=True)
  z = check_number(d.noise_multiplier, "fl.dp.noise_multiplier", low=0)
  target = check_number(d.target_epsilon, "fl.dp.target_epsilon", low=0)
  delta = check_number(d.delta, "fl.dp.delta", low=0, high=1, low_open=True, high_open=True)
  adaptive = check_flag(d.adaptive_clipping, "fl.dp.adaptive_clipping")
  gamma = check_number(d.target_quantile, "fl.dp.target_quantile", low=0, high=1)
  eta = check_number(d.clip_learning_rate, "fl.dp.clip_learning_rate", low=0)
  count_std = check_number(d.count_noise_std, "fl.dp.count_noise_std", low=0)
  name = check_one_of(d.accountant, ACCOUNTANTS, "fl.dp.accountant")
  sampling = check_one_of(d.sampling, SAMPLINGS, "fl.dp.sampling")
  if not enabled:
    return None
  num_clients, expected = config.fl.num_clients, float(config.fl.clients_per_round)
  if name == "pld" and sampling == "fixed":
    raise ConfigError("fl.dp.accountant='pld' accounts for Poisson sampling only: set "
                      "fl.dp.sampling='poisson', or fl.dp.accountant='rdp' for fixed-size "
                      "sampling")
  q = expected / num_clients
  if target > 0:
    z = accountant.calibrate_noise_multiplier(
        target, delta, sampling_rate=q, num_clients=num_clients,
        clients_per_round=config.fl.clients_per_round, rounds=config.num_rounds,
        accountant=name, sampling=sampling)
  if z == 0 and adaptive:
    raise ConfigError("fl.dp.adaptive_clipping=True needs noise: fl.dp.noise_multiplier=0 "
                      "leaves none to share with the clipping quantile")
  count_std = count_std or expected / 20
  z_update = z
  if adaptive:
    if z >= 2 * count_std:
      raise ConfigError(
          f"fl.dp.noise_multiplier={z:.4g} leaves no budget for adaptive clipping's count "
          f"noise σ_b={count_std:.4g}: it needs σ_b > z/2; raise fl.dp.count_noise_std")
    z_update = (z ** -2 - (2 * count_std) ** -2) ** -0.5
  return DPSpec(clip, z, z_update, delta, adaptive, gamma, eta, count_std, expected, sampling,
                q, num_clients, name, target)


def init_state(spec: DPSpec) -> dict:
  """The server's DP state for round 0: the clipping norm ``C``."""
  return {"clip_norm": jnp.asarray(spec.clip_norm, jnp.float32)}


def row_norms(messages: Any) -> jax.Array:
  """``‖Δ_i‖``: each row's L2 norm over every leaf of the stacked message ``[K, ...]``."""
  squares = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in jax.tree.leaves(messages)]
  return jnp.sqrt(sum(squares))


def clip_rows(messages: Any, real: jax.Array, clip_norm: jax.Array) -> tuple[Any, jax.Array]:
  """``(Δ_i · min(1, C / ‖Δ_i‖), ‖Δ_i‖)`` for each row; padding rows (``real`` False) → 0.

  A row within the bound is multiplied by exactly 1, so it passes unchanged.
  """
  norms = row_norms(messages)
  scale = jnp.where(norms > clip_norm, clip_norm / jnp.maximum(norms, 1e-30), 1.0)

  def clip(x):
    shape = (-1,) + (1,) * (x.ndim - 1)
    # where, not a product with 0: a padding row never reaches the sum, whatever it holds.
    return jnp.where(real.reshape(shape), x * scale.astype(x.dtype).reshape(shape),
                     jnp.zeros((), x.dtype))

  return jax.tree.map(clip, messages), norms


def _gaussian_like(key: jax.Array, tree: Any) -> Any:
  """Independent ``N(0, 1)`` draws shaped like ``tree``'s leaves."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves, strict=True)])


def privatize(key: jax.Array, messages: Any, real: jax.Array, state: dict,
              spec: DPSpec) -> tuple[Any, dict, dict]:
  """DP-FedAvg's noisy mean of the real rows of ``messages`` ``[K, ...]`` (module docstring).

  Returns:
    ``(Δ̃, new_state, metrics)``: the mean message (no leading axis), the DP state
    with adaptive clipping's next ``C``, and ``dp/clip_norm`` (``C`` this round),
    ``dp/clipped_fraction`` (real clients with ``‖Δ_i‖ > C``) and ``dp/noise_std``
    (``z_Δ C / K̄``, the noise std on each coordinate of ``Δ̃``).
  """
  k_update, k_count = jax.random.split(key)
  clip_norm = state["clip_norm"]
  clipped, norms = clip_rows(messages, real, clip_norm)
  # Σ_i clip(Δ_i) / K̄ as one tensordot; with no clipping and K̄ real clients of
  # equal size this is FedAvg's mean to the bit.
  mean = weighted_sum(clipped, real.astype(jnp.float32) / spec.expected_clients)
  noise_std = spec.update_noise_multiplier * clip_norm / spec.expected_clients
  if spec.update_noise_multiplier > 0:
    noise = _gaussian_like(k_update, mean)
    mean = jax.tree.map(lambda m, n: m + noise_std.astype(m.dtype) * n, mean, noise)
  num_real = jnp.maximum(jnp.sum(real.astype(jnp.float32)), 1.0)
  over = (norms > clip_norm) & real
  new_state = state
  if spec.adaptive:
    # Σ (b_i − ½): one client moves it by ½, the sensitivity z_Δ's split assumes.
    below = jnp.where(real, (norms <= clip_norm).astype(jnp.float32) - 0.5, 0.0)
    noisy_below = (jnp.sum(below) + spec.count_noise_std * jax.random.normal(k_count)) \
        / spec.expected_clients + 0.5
    new_clip = clip_norm * jnp.exp(-spec.clip_learning_rate
                                   * (noisy_below - spec.target_quantile))
    new_state = {**state, "clip_norm": new_clip.astype(jnp.float32)}
  metrics = {"dp/clip_norm": clip_norm.astype(jnp.float32),
             "dp/clipped_fraction": jnp.sum(over.astype(jnp.float32)) / num_real,
             "dp/noise_std": jnp.asarray(noise_std, jnp.float32)}
  return mean, new_state, metrics
