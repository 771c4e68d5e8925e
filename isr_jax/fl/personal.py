"""Which parameters stay on their client, and how a client's model is put together.

Personalized FL keeps part of the parameters on each client across rounds: a
personal head (FedPer, FedRep, FedRoD's, FedAIMS), a personal body (LG-FedAvg),
the whole model (Local), and the ISR adapters when they are not aggregated
(``isr.aggregate_adapters=False``). An algorithm names the part by
:data:`PERSONAL_PARTS`; models name their classifier ``head`` (every model of
:mod:`isr_jax.models` does, :data:`HEAD`), so an algorithm says "keep the head"
without knowing the model.

The personal leaves of all clients live in ``TrainState.client_states
["personal"]``, a pruned copy of the ``{"model", "adapters"}`` tree holding only
those leaves, stacked on a leading client axis. The round gathers the sampled
clients' rows, starts each client from the global tree with its own leaves put
in (:func:`merge`), and scatters them back; they never travel, so they are
zeroed in what the server receives and left out of the byte counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# The top-level model attribute(s) that form the classifier ψ; the rest is the body φ.
HEAD = ("head",)
PERSONAL_PARTS = ("", "head", "body", "all")

Path = tuple[Any, ...]


def _key(k) -> Any:
  return getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))


def is_head(path: Path) -> bool:
  """Whether a ``{"model", "adapters"}`` leaf path lies in the model's head."""
  keys = [_key(k) for k in path]
  return len(keys) > 1 and keys[0] == "model" and keys[1] in HEAD


def personal_predicate(part: str, aggregate_adapters: bool = True) -> Callable[[Path], bool]:
  """``path -> bool``: True for the leaves of ``{"model", "adapters"}`` that stay home.

  Args:
    part: the model part the algorithm keeps on the client, one of
      :data:`PERSONAL_PARTS` (``""``: none; ``"all"``: the whole tree, the ISR
      adapters included, since nothing of a Local client travels).
    aggregate_adapters: False keeps the ISR adapters on the clients too.
  """
  if part not in PERSONAL_PARTS:
    raise ValueError(f"personal part {part!r} is not one of {PERSONAL_PARTS}")

  def personal(path: Path) -> bool:
    keys = [_key(k) for k in path]
    # A message or state may hold params-shaped trees under its own keys
    # (SCAFFOLD's {"delta", "delta_c"}): find the {"model", "adapters"} level.
    for i, k in enumerate(keys):
      if k == "adapters":
        return part == "all" or not aggregate_adapters
      if k == "model":
        sub = ("model", *keys[i + 1:])
        head = is_head(sub)
        return part == "all" or (part == "head" and head) or (part == "body" and not head)
    return False

  return personal


def select(tree, keep: Callable[[Path], bool]) -> dict:
  """The nested dict of the leaves of ``tree`` whose path ``keep`` accepts (pruned)."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if keep(path):
      node = out
      for k in path[:-1]:
        node = node.setdefault(_key(k), {})
      node[_key(path[-1])] = leaf
  return out


def merge(tree, personal):
  """``tree`` with the leaves that ``personal`` holds (same paths) replaced by them."""
  if not isinstance(personal, dict):
    return personal
  return {k: merge(v, personal[k]) if k in personal else v for k, v in tree.items()}


def zero_personal(tree, personal: Callable[[Path], bool]):
  """``tree`` with the personal leaves set to zero (what the server receives of them)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros_like(x) if personal(path) else x, tree)


def travelling_bytes(tree, personal: Callable[[Path], bool],
                     leaf_bytes: Callable | None = None) -> int:
  """Bytes of the leaves of ``tree`` that cross the network (static: shapes and dtypes).

  ``leaf_bytes(leaf) -> int`` encodes one leaf (a compressor's); ``None``: raw bytes.
  """
  size = leaf_bytes or (lambda x: math.prod(x.shape) * x.dtype.itemsize)
  return sum(size(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
             if not personal(path))
