"""What a round reports: the loss terms, client drift, heterogeneity, local steps and traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.fl.aggregation import ClientResults
from isr_jax.fl.algorithm import FLAlgorithm, ServerBroadcast, weighted_sum
from isr_jax.fl.personal import travelling_bytes
from isr_jax.fl.selection import SampledClients
from isr_jax.fl.spec import FLSpec


def training_metrics(results: ClientResults, sampled: SampledClients,
                     spec: FLSpec) -> dict[str, jax.Array]:
  """``train/<term>`` (means over the steps that ran), ``fl/client_drift``,
  ``fl/local_steps`` and, when measured, ``fl/heterogeneity``."""
  total_steps = jnp.maximum(jnp.sum(results.num_steps), 1)
  metrics = {f"train/{k}": jnp.sum(v) / total_steps for k, v in results.aux_sum.items()}
  metrics["train/loss"] = metrics.pop("train/total")
  weights = results.weights
  metrics["fl/client_drift"] = jnp.sum(weights * results.drift)  # Lemma 2: Σ w_n ‖δ_n‖²
  if spec.measure_heterogeneity:
    # Eq. 13 with ∇L_T(θ_t) = Σ_n w_n ∇L_T^n(θ_t):  H_t = Σ w_n ‖g_n‖² − ‖Σ w_n g_n‖².
    sq = jax.vmap(lambda g: otu.tree_norm(g, squared=True))(results.grads)
    mean = weighted_sum(results.grads, weights)
    metrics["fl/heterogeneity"] = jnp.sum(weights * sq) - otu.tree_norm(mean, squared=True)
  metrics["fl/local_steps"] = (jnp.sum(results.num_steps)
                               / jnp.maximum(jnp.sum(sampled.real), 1))
  return metrics


def traffic_metrics(algorithm: FLAlgorithm, messages: Any, broadcast: ServerBroadcast,
                    sampled: SampledClients, personal: Callable,
                    leaf_bytes: Callable | None = None) -> dict[str, jax.Array]:
  """``comm/up_bytes`` and ``comm/down_bytes`` of the round.

  Per real sampled client: the message up, the algorithm's downlink down, less
  the personal leaves; shapes are static, so this costs nothing at run time.
  ``messages`` are stacked on a leading axis (one row is one client's message);
  ``leaf_bytes(ShapeDtypeStruct) -> int`` is what one message leaf takes on the
  uplink (a compressor's encoding; ``None``: its raw bytes).
  """
  num_real = jnp.sum(sampled.data.num_examples > 0).astype(jnp.float32)
  one_message = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape[1:], m.dtype), messages)
  up = travelling_bytes(one_message, personal, leaf_bytes)
  down = travelling_bytes(algorithm.downlink(broadcast), personal)
  return {"comm/up_bytes": num_real * up, "comm/down_bytes": num_real * down}
