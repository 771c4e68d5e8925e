"""Malicious clients for testing robust rules: a fraction of each round's sampled clients.

Each round the first ``f = round(fraction · n)`` of the round's ``n`` real
clients in sampling order attack (rounded half up; ``n`` counts the clients
left after dropouts). Sampling is already uniformly random without
replacement, so the attackers are a uniformly random ``f``-subset of the
sampled clients, a fixed number of them every round, drawn from the seed.
Attacks (``fl.robust.attack``), each on the attacker's whole message:

- ``sign_flip``: sends ``−s · Δ_i``.
- ``gaussian``: sends ``N(0, s² I)`` (Blanchard et al. 2017's Gaussian attack).
- ``label_flip``: trains honestly on flipped labels ``y → C − 1 − y`` for the ``C``
  classes (dense labels outside ``[0, C)``, such as 255, the ignore index, stay).
- ``alie`` ("A little is enough", Baruch, Baruch, Goldberg, NeurIPS 2019): every
  attacker sends ``μ − z σ``, with ``μ, σ`` the coordinate-wise mean and
  (population) standard deviation of the honest clients' messages and the paper's
  ``z_max = Φ⁻¹((n − s) / n)``, ``s = ⌊n/2 + 1⌋ − f`` (the honest clients the
  attackers need on their side); ``s < 1`` (attackers in the majority) is taken
  as 1, the largest finite ``z``.

Only float leaves change, and the honest clients' messages are left bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from isr_jax.config_checks import check_number, check_one_of
from isr_jax.data.packing import ClientData
from isr_jax.errors import ConfigError

ATTACKS = ("none", "sign_flip", "gaussian", "label_flip", "alie")


class AttackSpec(NamedTuple):
  """The attack, the fraction of sampled clients that run it, its scale and the classes.

  Attributes:
    kind: one of :data:`ATTACKS` but ``none``.
    fraction: the share of each round's real sampled clients that attack.
    scale: ``s`` of ``sign_flip`` and ``gaussian``.
    num_classes: ``K`` of ``label_flip``.
  """

  kind: str
  fraction: float
  scale: float
  num_classes: int


def attacker_count(fraction: float, n: int) -> int:
  """``round(fraction · n)``, half up: the attackers among ``n`` real clients."""
  # The slack absorbs the fraction's binary rounding (0.15 · 10 = 1.4999…).
  return math.floor(fraction * n + 0.5 + 1e-9)


def settings(config, num_classes: int = 0) -> AttackSpec | None:
  """The attack settings of ``config.fl.robust`` checked; ``None`` without attackers.

  ``num_classes`` (the dataset's) is read by ``label_flip``; 0 before the data is
  known. A fraction that makes no attacker of ``fl.clients_per_round`` clients is
  refused.
  """
  r = config.fl.robust
  kind = check_one_of(r.attack, ATTACKS, "fl.robust.attack")
  fraction = check_number(r.attacker_fraction, "fl.robust.attacker_fraction", low=0, high=1,
                          high_open=True)
  scale = check_number(r.attack_scale, "fl.robust.attack_scale", low=0)
  if kind == "none" and fraction > 0:
    raise ConfigError(f"fl.robust.attacker_fraction={fraction} with fl.robust.attack='none': "
                      f"name the attack, one of {list(ATTACKS[1:])}")
  if kind == "none" or fraction == 0:
    return None
  k = config.fl.clients_per_round
  if attacker_count(fraction, k) == 0:
    raise ConfigError(
        f"fl.robust.attacker_fraction={fraction} of fl.clients_per_round={k} rounds to 0 "
        f"attackers: raise it to at least {0.5 / k:.4g}")
  if kind == "label_flip" and num_classes == 1:
    raise ConfigError("fl.robust.attack='label_flip' needs at least 2 classes")
  return AttackSpec(kind, fraction, scale, num_classes)


def attackers(real: jax.Array, spec: AttackSpec) -> jax.Array:
  """``[K]`` bool: the first ``round(fraction · n)`` real lanes in sampling order."""
  k = real.shape[0]
  real = real.astype(bool)
  # f for every n the lanes can hold, computed in Python: exact, static.
  counts = jnp.asarray([attacker_count(spec.fraction, i) for i in range(k + 1)], jnp.int32)
  f = counts[jnp.sum(real.astype(jnp.int32))]
  # Dropouts may leave gaps: count real lanes, not lanes.
  position = jnp.cumsum(real.astype(jnp.int32)) - 1
  return real & (position < f)


def flip_labels(data: ClientData, attacker: jax.Array, spec: AttackSpec) -> ClientData:
  """The attackers' labels ``y ∈ [0, C)`` flipped to ``C − 1 − y`` (``C = spec.num_classes``).

  Labels ``[K, S, B]`` or dense ``[K, S, B, H, W]``; values outside ``[0, C)``
  (a segmentation ignore index) are kept.
  """
  c = spec.num_classes
  if c < 2:
    raise ConfigError(f"fl.robust.attack='label_flip' needs the number of classes (got {c}): "
                      "build the channel with channel_spec(config, num_classes)")
  y = data.y
  flip = attacker.reshape(attacker.shape + (1,) * (y.ndim - 1)) & (y >= 0) & (y < c)
  return data._replace(y=jnp.where(flip, (c - 1 - y).astype(y.dtype), y))


def corrupt(key: jax.Array, messages: Any, attacking: jax.Array, real: jax.Array,
            spec: AttackSpec) -> Any:
  """The stacked messages ``[K, ...]`` with the attacking lanes' float leaves replaced."""
  if spec.kind == "label_flip":  # the poison is in the data the attackers trained on
    return messages
  attacking = attacking.astype(bool) & real.astype(bool)
  honest = real.astype(bool) & ~attacking
  leaves, treedef = jax.tree.flatten(messages)
  keys = jax.random.split(key, max(len(leaves), 1))
  z = alie_z(jnp.sum(real.astype(jnp.int32)), jnp.sum(attacking.astype(jnp.int32)))

  def attack(x, k):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if spec.kind == "sign_flip":
      sent = -spec.scale * x
    elif spec.kind == "gaussian":
      sent = spec.scale * jax.random.normal(k, x.shape, jnp.float32)
    elif spec.kind == "alie":
      sent = jnp.broadcast_to(_alie_message(x, honest, z), x.shape)
    else:
      raise ValueError(f"no attack {spec.kind!r}; one of {ATTACKS[1:]}")
    return jnp.where(_per_row(attacking, x), sent.astype(x.dtype), x)

  return jax.tree.unflatten(treedef, [attack(x, k) for x, k in zip(leaves, keys, strict=False)])


def alie_z(n: jax.Array, f: jax.Array) -> jax.Array:
  """ALIE's ``z_max = Φ⁻¹((n − s) / n)``, ``s = ⌊n/2 + 1⌋ − f`` (Baruch et al. 2019, §4).

  ``s`` is kept at least 1 (attackers in the majority), so ``z`` stays finite;
  0 with fewer than 2 clients (nobody to hide among).
  """
  n = jnp.asarray(n, jnp.float32)
  s = jnp.maximum(jnp.floor(n / 2 + 1) - f, 1.0)
  z = norm.ppf((n - s) / jnp.maximum(n, 1.0))
  return jnp.where(n >= 2, z, 0.0)


def _alie_message(x: jax.Array, honest: jax.Array, z: jax.Array) -> jax.Array:
  """``μ − zσ`` over the honest rows of ``x`` (zero when there is none to imitate)."""
  h = _per_row(honest, x)
  count = jnp.maximum(jnp.sum(honest.astype(jnp.float32)), 1.0)
  x = x.astype(jnp.float32)
  mu = jnp.sum(jnp.where(h, x, 0.0), axis=0) / count
  sigma = jnp.sqrt(jnp.sum(jnp.where(h, jnp.square(x - mu), 0.0), axis=0) / count)
  return mu - z * sigma


def _per_row(mask: jax.Array, x: jax.Array) -> jax.Array:
  """``mask`` ``[K]`` shaped to broadcast over the rows of ``x`` ``[K, ...]``."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - 1))
