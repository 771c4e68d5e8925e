"""Splitting a labelled dataset among federated clients.

Every method returns one sorted int64 index array per client such that

* every example belongs to exactly one client (an exact cover, no duplicates),
* every client has at least one example,
* the same ``seed`` gives the same result.

Each method first computes an ``owner`` array (the client of every example) and
then groups it, which makes the exact cover hold by construction. Methods that
can leave a client without data (``dirichlet``, ``pathological``) then repair
empty clients deterministically with
:func:`~isr_jax.data.partition_methods.fill_empty_clients` instead of
resampling, so they always terminate.

``"natural"`` partitions by the dataset's own groups (the city or sequence of
every image, ``ArraySplit.groups``) instead of by labels. For segmentation
labels, :func:`dominant_class` reduces every label map to one class so that the
label-based methods apply too (e.g. Dirichlet over the dominant class).
"""

from __future__ import annotations

import numpy as np

from isr_jax.data.partition_methods import (
  dirichlet_owner,
  group_by_owner,
  iid_owner,
  natural_owner,
  pathological_owner,
  shards_owner,
)
from isr_jax.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "shards", "pathological")
"""Label-based methods of :func:`partition` (they need only the labels)."""

PARTITION_METHODS = (*PARTITIONS, "natural")
"""Every name accepted by :func:`partition` as ``method``; ``"natural"`` also needs ``groups``."""


def partition(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    *,
    seed: int,
    concentration: float = 0.5,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Assigns every example to exactly one client.

  Methods:

  * ``"iid"``: a random permutation split as evenly as possible.
  * ``"dirichlet"``: label-distribution skew (Hsu et al., 2019, "Measuring the
    effects of non-identical data distribution"): for every class, client
    proportions are drawn from ``Dir(concentration * 1)`` and the class's examples are
    cut at the cumulative proportions. Smaller ``concentration`` is more skewed. Clients
    left empty each take one random example from the then-largest client.
  * ``"shards"`` (McMahan et al., 2017): examples sorted by label (random order
    within a label) are cut into ``num_clients * shards_per_client`` equal-ish
    shards, and each client gets ``shards_per_client`` random shards.
  * ``"pathological"`` (#C classes per client; Li et al., 2022, "Federated
    Learning on Non-IID Data Silos: An Experimental Study"): each client holds
    ``classes_per_client`` distinct classes and each class is split evenly among
    its holders. Classes are dealt in a random order so that every class has a
    holder whenever ``num_clients * classes_per_client >= num_classes``; the
    remaining clients draw their classes at random. If there are too few clients
    for that, each class without a holder goes whole to one client, round-robin
    over clients, so those clients hold more than ``classes_per_client``
    classes. Empty clients are repaired as for ``"dirichlet"``.
  * ``"natural"``: clients follow ``groups`` (cities, sequences). With as many
    clients as groups, client ``i`` is the ``i``-th group in sorted group-id
    order. With more clients than groups, every group gets
    ``floor(num_clients / G)`` or ``ceil(num_clients / G)`` clients (the
    ``num_clients % G`` largest groups get the extra one; a group never gets
    more clients than examples, the surplus going to the groups with the most
    examples per client) and its examples are split evenly among them in a
    seeded random order; a group's clients have consecutive ids. With fewer
    clients than groups, the groups are merged round-robin: in a seeded random
    order, group ``j`` goes to client ``j % num_clients``.

  Args:
    labels: int class labels ``[N]``; for ``"natural"`` only their number
      matters (any ``[N, ...]`` array, e.g. segmentation maps).
    num_clients: number of clients, between 1 and ``N``.
    method: one of :data:`PARTITION_METHODS`.
    seed: seed of all random choices.
    concentration: the Dirichlet concentration α (``"dirichlet"`` only), > 0.
    shards_per_client: shards per client (``"shards"`` only), >= 1.
    classes_per_client: classes per client (``"pathological"`` only), between 1
      and the number of distinct labels.
    groups: int group id of every example ``[N]`` (``"natural"`` only, required).

  Returns:
    ``num_clients`` sorted int64 index arrays into ``labels``, all non-empty.

  Raises:
    ConfigError: unknown method or an impossible setting.
  """
  if method not in PARTITION_METHODS:
    raise ConfigError(
        f"fl.partition.method={method!r} is not one of {list(PARTITION_METHODS)}"
    )
  labels = np.asarray(labels)
  by_label = method != "natural"  # "natural" uses only the number of labels.
  if labels.ndim < 1 or (
      by_label and (labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer))
  ):
    raise ConfigError(
        f"partition: labels must be 1-D integer class ids, got {labels.dtype} {labels.shape}"
    )
  n = len(labels)
  if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
    raise ConfigError(f"fl.num_clients={num_clients!r} must be an integer >= 1")
  if num_clients > n:
    raise ConfigError(
        f"fl.num_clients={num_clients} exceeds the {n} examples to partition: every client needs "
        f"at least one; lower num_clients"
    )
  rng = np.random.default_rng(seed)
  if method == "iid":
    owner = iid_owner(n, num_clients, rng)
  elif method == "dirichlet":
    owner = dirichlet_owner(labels, num_clients, concentration, rng)
  elif method == "shards":
    owner = shards_owner(labels, num_clients, shards_per_client, rng)
  elif method == "natural":
    owner = natural_owner(groups, n, num_clients, rng)
  else:
    owner = pathological_owner(labels, num_clients, classes_per_client, rng)
  return group_by_owner(owner, num_clients)


def dominant_class(y: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
  """The most frequent labelled class of every example of a segmentation dataset.

  Args:
    y: int label maps ``[N, ...]`` (e.g. ``[N, H, W]``), classes >= 0.
    ignore_index: label of pixels that are not counted (None: count all).

  Returns:
    int64 ``[N]``: each map's most frequent class other than ``ignore_index``;
    ties go to the smallest class id, and a map with no labelled pixel gets 0.

  Raises:
    ConfigError: ``y`` is not an integer array of maps or has negative classes.
  """
  y = np.asarray(y)
  if y.ndim < 2 or not np.issubdtype(y.dtype, np.integer):
    raise ConfigError(
        f"dominant_class: y must be integer label maps [N, ...], got {y.dtype} {y.shape}"
    )
  flat = y.reshape(len(y), -1)
  out = np.zeros(len(y), np.int64)
  chunk = max(1, (1 << 24) // max(1, flat.shape[1]))  # Bounds the temporary arrays.
  for start in range(0, len(y), chunk):
    block = flat[start : start + chunk].astype(np.int64)
    valid = np.ones(block.shape, bool) if ignore_index is None else block != ignore_index
    if np.any(block[valid] < 0):
      raise ConfigError(f"dominant_class: y has negative class ids other than {ignore_index}")
    if not valid.any():
      continue
    num = int(block[valid].max()) + 1
    rows = np.broadcast_to(np.arange(len(block))[:, None], block.shape)
    counts = np.bincount(rows[valid] * num + block[valid], minlength=len(block) * num)
    out[start : start + len(block)] = counts.reshape(len(block), num).argmax(axis=1)
  return out
