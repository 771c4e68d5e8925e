"""FedGau (reconstructed from the abstract): Gaussian aggregation weights.

**Reconstructed from the abstract only**: the rule below is our reading of the
paper's abstract, not the paper's algorithm, so whatever it measures is a
measurement of this reconstruction; every table and list that shows it says so.

Kou, Lin, Tang, Ye, Wang, Zhu, Wu, IEEE T-ITS 2025, "Fast-Convergent and
Communication-Alleviated Heterogeneous Hierarchical Federated Learning in
Autonomous Driving" (arXiv 2409.19560; OmniISR paper
ref. [33], the OmniISR authors' prior AD-oriented variant). What the paper
states (abstract): each RGB image and each client's RGB dataset are modelled as
Gaussian distributions, and the aggregation weights are designed from them — so
that every image is differentiated by its own statistics and the dataset
statistics are used *in addition to* the data volume — with the Bhattacharyya
distance ``D_B`` measuring how close two Gaussians are. Local training is
FedAvg's. The paper's other part, AdapRS (scheduling of edge/cloud
aggregations in hierarchical FL), has no counterpart in a flat FL round.

Only the abstract-level description was available to us (the authors'
repository, WeibinKOU/FedGau, holds the resulting coefficients as constants in
its configs, not the code computing them), so the rule below is our reading:

* Image ``i``: per channel ``ch``, the Gaussian ``N(m_i^ch, v_i^ch)`` of its
  pixel values (channels independent).
* Dataset statistics: each client's ``(|D_n|, Σ_i m_i, Σ_i (v_i + m_i²))``
  give the moment-matched Gaussian ``N(μ, σ²)`` of all clients' pixels (flat FL
  has no edge level, so the clients' dataset Gaussians meet in the global one;
  ``init_server_state`` computes it from the packed data, which is what the
  uploaded statistics would give).
* Each image counts with its Bhattacharyya coefficient to that Gaussian,
  ``s_i = exp(−γ D_B(N_i, N(μ, σ²)))`` with
  ``D_B = Σ_ch [(m − μ)²/(4(v + σ²)) + ½ ln((v + σ²)/(2 √(v σ²)))]``, and the
  client's weight is ``w_n = S_n / Σ_{k∈S_t} S_k``, ``S_n = Σ_{i∈D_n} s_i``:
  volume (one term per image) times typicality (``s_i ∈ (0, 1]``).
  ``S_n`` is computed by the client (``client_init``) and uploaded with its
  delta (one scalar).
* ``γ ≥ 0`` (our addition; the paper has none) scales ``D_B``: ``γ = 1`` (the
  default) is the plain Bhattacharyya coefficient, ``γ = 0`` gives
  ``S_n = |D_n|``, i.e. FedAvg exactly — as do clients whose images all share
  one Gaussian. Variances get ``+1e-6`` so constant images stay finite.

Padding clients (round weight 0) keep weight 0; if every ``S`` underflows the
round's ``|D_n|`` weights are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm, weighted_sum
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg

VAR_EPS = 1e-6


def pixel_moments(x: jax.Array, lead: int) -> tuple[jax.Array, jax.Array]:
  """Per-example, per-channel mean and variance over the pixel axes.

  ``x`` is ``[*lead_axes, *example_shape]``; the last axis is the channel axis
  when an example has at least two axes, else an example is one channel.
  """
  x = x.astype(jnp.float32)
  if x.ndim - lead < 2:
    x = x[..., None]
  axes = tuple(range(lead, x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - jnp.expand_dims(mean, axes)), axis=axes)
  return mean, var


def bhattacharyya(m1, v1, m2, v2) -> jax.Array:
  """``D_B`` of two diagonal Gaussians (summed over the last, channel axis)."""
  v1, v2 = v1 + VAR_EPS, v2 + VAR_EPS
  total = v1 + v2
  per_channel = (0.25 * jnp.square(m1 - m2) / total
                 + 0.5 * (jnp.log(total) - jnp.log(2.0) - 0.5 * (jnp.log(v1) + jnp.log(v2))))
  return jnp.sum(per_channel, axis=-1)


def init_server_state(params, data):
  """``N(μ, σ²)`` per channel: the moment-matched Gaussian of every client's pixels."""
  del params
  mean, var = pixel_moments(data.x, lead=3)
  w = data.mask.astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mu = jnp.sum(w * mean, axis=(0, 1, 2)) / n
  second = jnp.sum(w * (var + jnp.square(mean)), axis=(0, 1, 2)) / n
  return {"mean": mu, "var": jnp.maximum(second - jnp.square(mu), 0.0)}


def aggregation_weights(scores: jax.Array, weights: jax.Array) -> jax.Array:
  """``S_n / Σ S_k`` over the real (weight > 0) clients of the round."""
  s = jnp.where(weights > 0, scores, 0.0)
  total = jnp.sum(s)
  return jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), weights)


def server_update(params, alg_state, messages, weights):
  del params
  w = aggregation_weights(messages["score"], weights)
  pseudo_grad = jax.tree.map(lambda d: -d, weighted_sum(messages["delta"], w))
  return pseudo_grad, alg_state


def fedgau(gamma: float = 1.0) -> FLAlgorithm:
  """FedGau (reconstructed from the abstract) with Bhattacharyya-distance scale ``gamma``.

  ``gamma`` (γ ≥ 0) is our addition; see the module docstring.
  """
  if gamma < 0:
    raise ValueError(f"gamma={gamma} must be >= 0")

  def client_init(broadcast, client_state, client_data):
    """``S_n = Σ_i exp(−γ D_B(N_i, N(μ, σ²)))`` over the client's real images."""
    del client_state
    real = client_data.mask.astype(jnp.float32)
    if gamma == 0:
      return {"score": jnp.sum(real)}
    mean, var = pixel_moments(client_data.x, lead=2)
    g = broadcast.alg_state
    distance = bhattacharyya(mean, var, g["mean"], g["var"])
    return {"score": jnp.sum(real * jnp.exp(-gamma * distance))}

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    message, state = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    return {**message, "score": ctx["score"]}, state

  return fedavg()._replace(
      name="fedgau", init_server_state=init_server_state, client_init=client_init,
      client_final=client_final, server_update=server_update, mean_messages=False)


# FedGau (reconstructed from the abstract; Kou et al., T-ITS 2025): the paper's
# rule is not available to us; γ = 1 (the plain Bhattacharyya coefficient) is
# our reconstruction's own parameter (module docstring).
DEFAULTS = dict(gamma=1.0)


def settings(config, name: str = "fedgau") -> dict:
  """:func:`fedgau`'s arguments from ``config.fl.<name>``."""
  return dict(gamma=check_number(config.fl[name].gamma, f"fl.{name}.gamma", low=0))
