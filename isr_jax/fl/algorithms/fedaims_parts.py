"""FedAIMS's parts (methods §4): block features, class prototypes (Eq. 3, 4),
supervision sampling (Algorithm 2), the σ adapters and the prototype distance
(Eq. 5, 8). Pure functions; :mod:`isr_jax.fl.algorithms.fedaims` composes them
into the algorithm."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.adapters import init_adapter
from isr_jax.errors import ConfigError
from isr_jax.fl.personal import HEAD
from isr_jax.nn.dense import matmul
from isr_jax.nn.pooling import global_avg_pool

REDUCTIONS = ("sum", "mean", "mse")
AGGREGATIONS = ("present", "literal")
COSINE_EPS = 1e-8


# -- blocks and their features --


def block_features(tap: jax.Array, pool: bool) -> jax.Array:
  """``φ^j(x)``: the tap ``[B, ...]`` flattened to ``[B, D_j]``, or pooled to ``[B, C_j]``."""
  return global_avg_pool(tap) if pool else tap.reshape(tap.shape[0], -1)


def block_names(tap_order: Sequence[str], blocks: Sequence[str], representation: str
                ) -> tuple[str, ...]:
  """Blocks 1..m: the model's taps in block order (or ``blocks``), ending at the head's input."""
  taps = tuple(tap_order)
  names = tuple(blocks) or taps
  unknown = [n for n in names if n not in taps]
  if unknown:
    raise ConfigError(f"fl.fedaims.blocks: {unknown} not among the model's taps {list(taps)}")
  if list(names) != sorted(names, key=taps.index) or len(set(names)) != len(names):
    raise ConfigError(f"fl.fedaims.blocks={list(names)} must be distinct taps in block "
                      f"order {list(taps)}")
  if names[-1] != representation:
    raise ConfigError(f"fl.fedaims.blocks={list(names)} must end with the head's input tap "
                      f"{representation!r} (block m)")
  if len(names) < 2:
    raise ConfigError(f"fl.fedaims.blocks={list(names)}: FedAIMS needs m >= 2 blocks")
  return names


def tap_layout(apply: Callable, model_params, x: jax.Array) -> dict[str, tuple[int, ...]]:
  """Every tap's shape for the input ``x``, in the model's block order, without running it.

  The order is recorded while tracing: ``eval_shape`` returns the dict with its keys
  sorted, and the models write their taps in block order (``model.tap_names``).
  """
  order: list[str] = []

  def forward(p, x):
    _, taps = apply(p, x)
    order.extend(taps)
    return taps

  shapes = jax.eval_shape(forward, model_params, x)
  return {name: tuple(shapes[name].shape) for name in order}


# -- Eq. 3 and Eq. 4: prototypes --


def class_sums(features: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
  """``(Σ_{y=k} φ(x), #{y=k})`` over the real examples of one batch (Eq. 3's parts)."""
  valid = mask.astype(features.dtype)
  labels = jnp.where(mask, labels, 0)
  sums = jax.ops.segment_sum(features * valid[:, None], labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(valid, labels, num_segments=num_classes)
  return sums, counts


def prototypes_from_sums(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Eq. 3: the class means; an absent class (count 0) gets the zero prototype."""
  present = counts[:, None] > 0
  return jnp.where(present, sums / jnp.where(present, counts[:, None], 1.0), 0.0)


def client_prototypes(apply: Callable, model_params, data, block: str, *, pool: bool,
                      num_classes: int) -> tuple[jax.Array, jax.Array]:
  """``(C_i [K, D], counts [K])`` of block ``block`` over the client's data (Eq. 3).

  One pass over the client's packed batches ``data.x [S, B, ...]``.
  """

  def one_batch(carry, batch):
    x, y, mask = batch
    _, taps = apply(model_params, x)
    sums, counts = class_sums(block_features(taps[block], pool), y, mask, num_classes)
    return (carry[0] + sums, carry[1] + counts), None

  x0 = jax.ShapeDtypeStruct(data.x.shape[1:], data.x.dtype)
  feature_dim = jax.eval_shape(
      lambda x: block_features(apply(model_params, x)[1][block], pool), x0).shape[-1]
  init = (jnp.zeros((num_classes, feature_dim), jnp.float32),
          jnp.zeros((num_classes,), jnp.float32))
  (sums, counts), _ = lax.scan(one_batch, init, (data.x, data.y, data.mask))
  return prototypes_from_sums(sums, counts), counts


def aggregate_prototypes(prototypes: jax.Array, counts: jax.Array, weights: jax.Array,
                         mode: str = "present") -> jax.Array:
  """Eq. 4: ``C_g = Σ_i p_i C_i`` over the clients ``[n, K, D]`` with weights ``p`` ``[n]``.

  ``"present"``: per class, over the clients with ``counts > 0``, ``p_i``
  renormalised among them (0 where no client has the class); ``"literal"``: the
  printed sum, a missing prototype counting as 0.
  """
  if mode == "literal":
    return jnp.tensordot(weights, prototypes, axes=1)
  if mode != "present":
    raise ValueError(f"aggregation={mode!r} is not one of {AGGREGATIONS}")
  w = weights[:, None] * (counts > 0)  # [n, K]
  total = jnp.sum(w, axis=0)
  summed = jnp.einsum("nk,nkd->kd", w, prototypes)
  return jnp.where(total[:, None] > 0, summed / jnp.where(total > 0, total, 1.0)[:, None], 0.0)


# -- Algorithm 2: supervision sampling --


def flat_backbone(model_params) -> jax.Array:
  """The backbone φ (every model leaf outside the head) as one vector."""
  body = {k: v for k, v in model_params.items() if k not in HEAD}
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(body)])


def cosine_matrix(vectors: jax.Array) -> jax.Array:
  """``cos(v_i, v_j)`` for the rows of ``vectors`` ``[n, P]``."""
  norms = jnp.sqrt(jnp.sum(vectors * vectors, axis=1))
  unit = vectors / jnp.maximum(norms, COSINE_EPS)[:, None]
  return jnp.matmul(unit, unit.T, precision=lax.Precision.HIGHEST)


def supervision_sampling(similarity: jax.Array, real: jax.Array, num_groups: int
                         ) -> jax.Array:
  """Algorithm 2: each client's supervised block, ``1..num_groups`` (0 for padding).

  Clients in the given order go to one of ``num_groups`` (= m − 1) groups: the
  candidates are the groups of minimal current size (balance, Eq. 10's
  constraint); among them the one with the least ``δ_{i,k}`` (Eq. 11: mean
  similarity to its members, 0 when empty), ties to the lowest index. Groups
  are then stably sorted by size, ascending; the r-th supervises block r, so
  larger groups get deeper blocks.

  Args:
    similarity: ``[n, n]`` cosine similarities of the clients' backbones.
    real: ``[n]`` bool, False for padding clients (never assigned).
    num_groups: m − 1.
  """
  n = similarity.shape[0]

  def add(carry, i):
    member, sizes = carry  # member [n, G] one-hot rows; sizes [G]
    sums = similarity[i] @ member
    delta = jnp.where(sizes > 0, sums / jnp.maximum(sizes, 1).astype(sums.dtype), 0.0)
    candidate = sizes == jnp.min(sizes)
    group = jnp.argmin(jnp.where(candidate, delta, jnp.inf))  # first minimum: lowest index
    join = real[i]
    member = member.at[i, group].set(join.astype(member.dtype))
    sizes = sizes.at[group].add(join.astype(sizes.dtype))
    return (member, sizes), None

  init = (jnp.zeros((n, num_groups), similarity.dtype), jnp.zeros((num_groups,), jnp.int32))
  (member, sizes), _ = lax.scan(add, init, jnp.arange(n))
  order = jnp.argsort(sizes, stable=True)  # order[r] = the group at rank r
  rank = jnp.zeros((num_groups,), jnp.int32).at[order].set(jnp.arange(num_groups))
  group = jnp.argmax(member, axis=1)
  return jnp.where(real, rank[group] + 1, 0)


# -- Eq. 5 / 8 and the adapters --


def init_sigma(key: jax.Array, d_in: int, hidden: int, d_out: int) -> dict:
  """σ: Dense(d_in→h) → ReLU → Dense(h→d_out), Flax's Dense initialisation."""
  k1, k2 = jax.random.split(key)
  return {"hidden": init_adapter(k1, d_in, hidden), "out": init_adapter(k2, hidden, d_out)}


def apply_sigma(sigma: dict, c: jax.Array) -> jax.Array:
  h = jax.nn.relu(matmul(c, sigma["hidden"]["kernel"]) + sigma["hidden"]["bias"])
  return matmul(h, sigma["out"]["kernel"]) + sigma["out"]["bias"]


def prototype_distance(target: jax.Array, features: jax.Array, mask: jax.Array,
                       reduction: str = "sum") -> jax.Array:
  """Eq. 5/8 on a batch: ``Σ_{real b} ‖target_b − φ_b‖²`` (``sum``), /N (``mean``),
  /(N·D) (``mse``)."""
  squared = jnp.sum(jnp.square(target - features), axis=-1)
  total = jnp.sum(jnp.where(mask, squared, 0.0))
  if reduction == "sum":
    return total
  n = jnp.maximum(jnp.sum(mask.astype(total.dtype)), 1.0)
  if reduction == "mean":
    return total / n
  if reduction == "mse":
    return total / (n * features.shape[-1])
  raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
