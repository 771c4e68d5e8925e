"""Stragglers and dropouts: clients that finish part of their local work, or none of it.

Each round, every sampled client independently drops out with probability
``fl.stragglers.dropout`` (it sends nothing: no weight, no state change, no
traffic, as if it had not been sampled), and a client that stays is a straggler
with probability ``fl.stragglers.straggler_fraction``: it completes a fraction
``u ~ U[min_work, 1)`` of its local steps, at least one (the first steps of its
schedule; the rest are skipped as padding steps are). The draws use the round's
channel key, so a seed gives the same stragglers on every run and resume. This
is the heterogeneous local work FedNova (Wang et al. NeurIPS 2020) normalizes
for: its ``a_i`` counts the steps that ran.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_number

DEFAULTS = {
    "dropout": 0.0,  # P(a sampled client drops out of the round)
    "straggler_fraction": 0.0,  # P(a client that stays completes only part of its steps)
    "min_work": 0.1,  # a straggler completes U[min_work, 1) of its local steps
}


class StragglerSpec(NamedTuple):
  """``dropout``, ``straggler_fraction`` and ``min_work`` as in :data:`DEFAULTS`."""

  dropout: float
  straggler_fraction: float
  min_work: float


def settings(config) -> StragglerSpec | None:
  """``config.fl.stragglers`` checked; ``None`` when every client does all its work."""
  s = config.fl.stragglers
  dropout = check_number(s.dropout, "fl.stragglers.dropout", low=0, high=1, high_open=True)
  fraction = check_number(s.straggler_fraction, "fl.stragglers.straggler_fraction", low=0,
                          high=1)
  min_work = check_number(s.min_work, "fl.stragglers.min_work", low=0, high=1, low_open=True)
  if dropout == 0 and fraction == 0:
    return None
  return StragglerSpec(dropout, fraction, min_work)


def draw(key: jax.Array, real: jax.Array, spec: StragglerSpec) -> tuple[jax.Array, jax.Array]:
  """Who stays and how much of its work it does, for the round's sampled clients.

  Args:
    key: the round's key for stragglers.
    real: ``[K]`` the sampled clients (False for the padding that fills the mesh).
    spec: the settings.

  Returns:
    ``(stays [K] bool, work [K] float32)``: ``work`` is 1 for a client that does
    all its steps and ``u ~ U[min_work, 1)`` for a straggler.
  """
  k_drop, k_slow, k_work = jax.random.split(key, 3)
  k = real.shape[0]
  stays = real & (jax.random.uniform(k_drop, (k,)) >= spec.dropout)
  slow = jax.random.uniform(k_slow, (k,)) < spec.straggler_fraction
  u = jax.random.uniform(k_work, (k,), minval=spec.min_work, maxval=1.0)
  return stays, jnp.where(slow, u, 1.0).astype(jnp.float32)


def keep_steps(active: jax.Array, work: jax.Array) -> jax.Array:
  """``[T]`` the steps a client runs: the first ``max(1, ⌊work · n⌋)`` of its ``n``
  active steps (``active`` marks the steps with at least one real example)."""
  n = jnp.sum(active.astype(jnp.int32))
  budget = jnp.maximum(jnp.floor(work * n.astype(jnp.float32)).astype(jnp.int32), 1)
  return active & (jnp.cumsum(active.astype(jnp.int32)) <= budget)
