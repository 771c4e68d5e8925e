"""Helpers that several federated algorithms share, in one place.

Label statistics and per-position weights (FedIR, BalanceFL), the restricted
softmax KL and the masked position mean (FedNTD, MOON, BalanceFL), FedNova's
step weights (FedNova, SCAFFOLD), the proximal-term gradient (FedProx,
FedDyn) and the body/head split (FedPer, FedRep, LG-FedAvg, FedBABU).
Algorithms import these from here, never from one another; FedAvg's own
pieces (:mod:`isr_jax.fl.algorithms.fedavg`) are the base every algorithm may
build on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import grad_with_terms
from isr_jax.fl.personal import HEAD, is_head
from isr_jax.losses import masked_mean

# -- label statistics (FedIR, Hsu et al. ECCV 2020; BalanceFL) --


def valid_positions(labels, mask, num_classes: int):
  """Positions that count: real examples (``mask``, over the leading axes of
  ``labels``) whose label lies in ``[0, K)``; for dense labels every pixel."""
  mask = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  return mask & (labels >= 0) & (labels < num_classes)


def label_counts(labels, mask, num_classes: int):
  """Examples (or pixels, for dense labels) per class among the valid positions.

  Counted per example in int32, then summed over examples in float32: a float32
  running count would stop growing at 2^24 pixels, a data set's total can
  exceed int32. The counts are exact integers up to 2^24 per class.
  """
  valid = valid_positions(labels, mask, num_classes)
  per_example = (mask.size, -1)

  def one(example_labels, example_valid):
    return jnp.zeros((num_classes,), jnp.int32).at[example_labels].add(
        example_valid.astype(jnp.int32), mode="drop")

  counts = jax.vmap(one)(labels.reshape(per_example), valid.reshape(per_example))
  return jnp.sum(counts.astype(jnp.float32), axis=0)


def position_weights(class_weight, labels, mask):
  """``p(y)/q_k(y)`` at every position of ``labels`` (``[B]`` or ``[B, H, W]``).

  Dense labels: 0 where the label is outside ``[0, K)`` (an index lookup would
  clamp 255 to the last class).
  """
  weight = class_weight[labels]
  if labels.ndim > mask.ndim:
    weight = jnp.where(valid_positions(labels, mask, class_weight.shape[0]), weight, 0.0)
  return weight


# -- distillation over a subset of classes (FedNTD, Lee et al. NeurIPS 2022) --


def restricted_log_softmax(logits: jax.Array, keep: jax.Array) -> jax.Array:
  """``log softmax`` over the classes where ``keep`` (last axis); 0 elsewhere.

  Finite everywhere and in every gradient, also when ``keep`` is all False
  (then it is 0): the left-out classes never enter an ``exp`` or a ``log``.
  """
  any_keep = jnp.any(keep, axis=-1, keepdims=True)
  top = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True)
  top = jax.lax.stop_gradient(jnp.where(any_keep, top, 0.0))
  shifted = jnp.where(keep, logits - top, 0.0)
  total = jnp.sum(jnp.where(keep, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  return jnp.where(keep, shifted - jnp.log(jnp.where(any_keep, total, 1.0)), 0.0)



def restricted_kl(student: jax.Array, teacher: jax.Array, keep: jax.Array,
                  tau: float) -> jax.Array:
  """``KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` over the classes where ``keep``, per position.

  The teacher logits get no gradient; 0 where no class is kept.
  """
  log_p_s = restricted_log_softmax(student / tau, keep)
  log_p_t = restricted_log_softmax(jax.lax.stop_gradient(teacher) / tau, keep)
  return jnp.sum(jnp.where(keep, jnp.exp(log_p_t) * (log_p_t - log_p_s), 0.0), axis=-1)


def position_mean(values: jax.Array, valid: jax.Array, mask: jax.Array,
                  weight: jax.Array | None = None) -> jax.Array:
  """``Σ w·v / #valid`` over positions ``[B, ...]`` that are ``valid`` and whose example is real.

  The normalisation of :func:`isr_jax.losses.masked_mean` (importance weights
  scale the terms, not the count, as FedIR needs); 0 when nothing is valid.
  ``weight`` is per example ``[B]``.
  """
  expand = lambda a: a.reshape(a.shape + (1,) * (values.ndim - a.ndim))
  weight = None if weight is None else jnp.broadcast_to(expand(weight), values.shape)
  return masked_mean(values, valid & expand(mask), weight)


# -- local step weights (FedNova, Wang et al. NeurIPS 2020) --


def step_weight_sum(num_steps: jax.Array, momentum: float = 0.0,
                    nesterov: bool = False) -> jax.Array:
  """``‖a_i‖₁`` after ``num_steps`` local steps of SGD with ``momentum``."""
  tau = jnp.asarray(num_steps, jnp.float32)
  if momentum == 0:
    return tau
  rho = momentum
  heavy_ball = (tau - rho * (1.0 - rho**tau) / (1.0 - rho)) / (1.0 - rho)
  return tau + rho * heavy_ball if nesterov else heavy_ball


# -- proximal terms (FedProx, FedDyn) --


def global_anchor(broadcast, client_state, client_data):
  """The client context of algorithms that only need the round's global model."""
  del client_state, client_data
  return {"global": broadcast.params}


def with_proximal_term(prox):
  """The local gradient of ``L_T + prox`` by autodiff of the sum (one forward pass).

  The proximal term reads the round's global model ``ctx["global"]`` as its
  anchor; its value is reported as ``prox`` and included in ``total``.
  """

  def client_grad(params, ctx, batch, problem, key):
    return grad_with_terms(params, batch, problem, lambda p, logits, taps: {
        "prox": (1.0, prox(p, ctx["global"], ctx, batch, problem, key))})

  return client_grad


# -- body / head splits (FedPer, FedRep, LG-FedAvg, FedBABU) --


def not_head(path) -> bool:
  """True for every leaf of ``{"model", "adapters"}`` outside the model's head: the body
  and the ISR adapters (which read the body's taps)."""
  return not is_head(path)


def require_head(algorithm: str):
  """An ``init_server_state`` that rejects a model without a head (no split to make).

  Without it a head/body split of a head-less model would silently keep nothing
  (or everything) on the clients.
  """

  def init_server_state(params, data=None):
    del data
    if not any(k in params["model"] for k in HEAD):
      raise ConfigError(
          f"fl.algorithm={algorithm!r} splits the model into body and head, but the model has "
          f"no parameters under {list(HEAD)} (top level: {sorted(map(str, params['model']))})")
    return {}

  return init_server_state
