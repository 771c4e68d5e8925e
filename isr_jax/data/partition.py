"""Splitting a labelled dataset among federated clients.

Every method returns one sorted int64 index array per client such that

* every example belongs to exactly one client (an exact cover, no duplicates),
* every client has at least one example,
* the same ``seed`` gives the same result.

Each method first computes an ``owner`` array (the client of every example) and
then groups it, which makes the exact cover hold by construction. Methods that
can leave a client without data (``dirichlet``, ``pathological``) then repair
empty clients deterministically with :func:`fill_empty_clients` instead of
resampling, so they always terminate.

``"natural"`` partitions by the dataset's own groups (the city or sequence of
every image, ``ArraySplit.groups``) instead of by labels. For segmentation
labels, :func:`dominant_class` reduces every label map to one class so that the
label-based methods apply too (e.g. Dirichlet over the dominant class).
"""

from __future__ import annotations

import math

import numpy as np

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
    alpha: float = 0.5,
    shards_per_client: int = 2,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
  """Assigns every example to exactly one client.

  Methods:

  * ``"iid"``: a random permutation split as evenly as possible.
  * ``"dirichlet"``: label-distribution skew (Hsu et al., 2019, "Measuring the
    effects of non-identical data distribution"): for every class, client
    proportions are drawn from ``Dir(alpha * 1)`` and the class's examples are
    cut at the cumulative proportions. Smaller ``alpha`` is more skewed. Clients
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
    alpha: Dirichlet concentration (``"dirichlet"`` only), > 0.
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
    owner = _iid_owner(n, num_clients, rng)
  elif method == "dirichlet":
    owner = _dirichlet_owner(labels, num_clients, alpha, rng)
  elif method == "shards":
    owner = _shards_owner(labels, num_clients, shards_per_client, rng)
  elif method == "natural":
    owner = _natural_owner(groups, n, num_clients, rng)
  else:
    owner = _pathological_owner(labels, num_clients, classes_per_client, rng)
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


def split_cloud(
    num_examples: int, cloud_fraction: float, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Holds out an IID random subset of the examples for the cloud (hybrid CL-FL mode).

  Args:
    num_examples: size ``N`` of the dataset.
    cloud_fraction: fraction of examples kept by the cloud, in ``[0, 1)``. The
      cloud gets ``round(cloud_fraction * N)`` examples, capped at ``N - 1`` so
      that at least one example remains for the clients.
    seed: seed of the random choice.

  Returns:
    ``(cloud_indices, remaining_indices)``: sorted int64 arrays that together
    cover ``range(N)`` exactly once; ``cloud_indices`` is empty for fraction 0.

  Raises:
    ConfigError: ``cloud_fraction`` outside ``[0, 1)`` or ``num_examples < 1``.
  """
  if not 0.0 <= cloud_fraction < 1.0:
    raise ConfigError(f"hybrid.cloud_fraction={cloud_fraction} must be in [0, 1)")
  if num_examples < 1:
    raise ConfigError(f"split_cloud: num_examples={num_examples} must be >= 1")
  num_cloud = min(int(round(cloud_fraction * num_examples)), num_examples - 1)
  perm = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(perm[:num_cloud]), np.sort(perm[num_cloud:])


def split_clients(
    client_indices: list[np.ndarray], labels: np.ndarray, test_fraction: float, *, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Splits every client's own examples into train and test (personalized FL, methods §4).

  Stratified: a client's examples are shuffled (seeded per client), stably
  ordered by label, and every ``1/test_fraction``-th one of that order goes to
  test, so each class keeps its share up to rounding. A client of ``n``
  examples gets ``⌊n·f + ½⌋`` test examples, its smallest classes possibly none.

  Args:
    client_indices: one index array per client (into ``labels``).
    labels: a class per example (segmentation: the dominant class).
    test_fraction: ``f`` in ``(0, 1)``.
    seed: seed of the shuffles.

  Returns:
    ``(train, test)``: per client, sorted index arrays that together are its
    examples.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ConfigError(f"fl.client_test_fraction={test_fraction} must be in (0, 1)")
  train, test = [], []
  for client, idx in enumerate(client_indices):
    rng = np.random.default_rng([seed, client])
    shuffled = np.asarray(idx)[rng.permutation(len(idx))]
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    i = np.arange(len(ordered))
    held = np.floor((i + 1) * test_fraction + 0.5) > np.floor(i * test_fraction + 0.5)
    train.append(np.sort(ordered[~held]))
    test.append(np.sort(ordered[held]))
  return train, test


def group_by_owner(owner: np.ndarray, num_clients: int) -> list[np.ndarray]:
  """Groups example indices by client.

  Args:
    owner: client id of every example ``[N]``, in ``[0, num_clients)``.
    num_clients: number of clients.

  Returns:
    ``num_clients`` sorted int64 index arrays (possibly empty).
  """
  order = np.argsort(owner, kind="stable").astype(np.int64)  # Stable: sorted within a client.
  sizes = np.bincount(owner, minlength=num_clients)
  return [group.copy() for group in np.split(order, np.cumsum(sizes)[:-1])]


def fill_empty_clients(
    owner: np.ndarray, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
  """Gives every client without examples one random example of the largest client.

  Clients are filled in increasing id; the donor is the client that is largest at
  that moment (lowest id among ties). Since ``N >= num_clients``, a client with
  two or more examples exists while any client is empty, so this takes at most
  ``num_clients`` moves and never empties a donor.

  Args:
    owner: client id of every example ``[N]``; modified in place.
    num_clients: number of clients (``<= N``).
    rng: source of the choice of example within the donor.

  Returns:
    ``owner``, with every client owning at least one example.
  """
  sizes = np.bincount(owner, minlength=num_clients)
  for client in np.flatnonzero(sizes == 0):
    donor = int(np.argmax(sizes))
    members = np.flatnonzero(owner == donor)
    owner[members[rng.integers(len(members))]] = client
    sizes[donor] -= 1
    sizes[client] += 1
  return owner


def _even_owner(n: int, parts: int) -> np.ndarray:
  """``[0, 0, 1, 1, 2, ...]``: positions ``0..n-1`` cut into ``parts`` near-equal runs."""
  sizes = np.full(parts, n // parts)
  sizes[: n % parts] += 1
  return np.repeat(np.arange(parts), sizes)


def _class_indices(labels: np.ndarray) -> list[np.ndarray]:
  """Indices of each distinct label, in increasing label order."""
  order = np.argsort(labels, kind="stable")
  _, starts = np.unique(labels[order], return_index=True)
  return np.split(order, starts[1:])


def _iid_owner(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
  owner = np.empty(n, np.int64)
  owner[rng.permutation(n)] = _even_owner(n, num_clients)
  return owner


def _natural_owner(
    groups: np.ndarray | None, n: int, num_clients: int, rng: np.random.Generator
) -> np.ndarray:
  if groups is None:
    raise ConfigError(
        "fl.partition.method='natural' needs the group (city/sequence) of every example, but "
        "the dataset has none: use a dataset with groups or another fl.partition.method"
    )
  groups = np.asarray(groups)
  if groups.shape != (n,) or not np.issubdtype(groups.dtype, np.integer):
    raise ConfigError(
        f"partition: groups must be 1-D integer ids, one per example ({n}), got "
        f"{groups.dtype} {groups.shape}"
    )
  _, group_of = np.unique(groups, return_inverse=True)
  group_of = group_of.reshape(-1)
  sizes = np.bincount(group_of)
  num_groups = len(sizes)
  if num_clients == num_groups:
    return group_of.astype(np.int64)
  if num_clients < num_groups:
    client_of_group = np.empty(num_groups, np.int64)
    client_of_group[rng.permutation(num_groups)] = np.arange(num_groups) % num_clients
    return client_of_group[group_of]
  per_group = _clients_per_group(sizes, num_clients)
  first = np.concatenate([[0], np.cumsum(per_group)[:-1]])
  owner = np.empty(n, np.int64)
  for g in range(num_groups):
    members = rng.permutation(np.flatnonzero(group_of == g))
    owner[members] = first[g] + _even_owner(len(members), per_group[g])
  return owner


def _clients_per_group(sizes: np.ndarray, num_clients: int) -> np.ndarray:
  """Clients of every group: as even as possible, at most the group's size, summing to K."""
  num_groups = len(sizes)
  per_group = np.full(num_groups, num_clients // num_groups, np.int64)
  per_group[np.argsort(-sizes, kind="stable")[: num_clients % num_groups]] += 1
  surplus = int(np.maximum(per_group - sizes, 0).sum())
  per_group = np.minimum(per_group, sizes)
  for _ in range(surplus):  # num_clients <= N, so room always remains somewhere.
    room = per_group < sizes
    load = np.where(room, sizes / per_group, -np.inf)
    per_group[int(np.argmax(load))] += 1
  return per_group


def _dirichlet_owner(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
  if not alpha > 0:  # Also rejects NaN.
    raise ConfigError(f"fl.partition.dirichlet_alpha={alpha} must be > 0")
  owner = np.empty(len(labels), np.int64)
  concentration = np.full(num_clients, float(alpha))
  for idx in _class_indices(labels):
    idx = rng.permutation(idx)
    p = rng.dirichlet(concentration)
    if not (np.all(np.isfinite(p)) and p.sum() > 0):  # Underflow guard for tiny alpha.
      p = np.eye(num_clients)[rng.integers(num_clients)]
    cuts = np.minimum(np.round(np.cumsum(p) * len(idx)).astype(np.int64), len(idx))
    cuts[-1] = len(idx)
    owner[idx] = np.repeat(np.arange(num_clients), np.diff(cuts, prepend=0))
  return fill_empty_clients(owner, num_clients, rng)


def _shards_owner(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> np.ndarray:
  if shards_per_client < 1:
    raise ConfigError(f"fl.partition.shards_per_client={shards_per_client} must be >= 1")
  n = len(labels)
  num_shards = num_clients * shards_per_client
  if num_shards > n:
    raise ConfigError(
        f"partition: {shards_per_client} shards per client x {num_clients} clients needs "
        f"{num_shards} shards but only {n} examples exist; lower fl.partition.shards_per_client "
        f"or num_clients"
    )
  perm = rng.permutation(n)
  by_label = perm[np.argsort(labels[perm], kind="stable")]  # Random order within a label.
  client_of_shard = np.empty(num_shards, np.int64)
  client_of_shard[rng.permutation(num_shards)] = np.repeat(
      np.arange(num_clients), shards_per_client
  )
  owner = np.empty(n, np.int64)
  owner[by_label] = client_of_shard[_even_owner(n, num_shards)]
  return owner


def _pathological_owner(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> np.ndarray:
  per_class = _class_indices(labels)
  num_classes = len(per_class)
  if not 1 <= classes_per_client <= num_classes:
    raise ConfigError(
        f"fl.partition.classes_per_client={classes_per_client} must be between 1 and the "
        f"{num_classes} classes in the labels"
    )
  held = _assign_classes(num_clients, num_classes, classes_per_client, rng)
  holders = [np.flatnonzero((held == c).any(axis=1)) for c in range(num_classes)]
  owner = np.empty(len(labels), np.int64)
  next_client = 0  # Round-robin target for classes that nobody holds.
  for idx, class_holders in zip(per_class, holders, strict=True):
    if class_holders.size == 0:
      owner[idx] = next_client
      next_client = (next_client + 1) % num_clients
      continue
    class_holders = rng.permutation(class_holders)  # Who gets the remainder varies.
    owner[rng.permutation(idx)] = class_holders[_even_owner(len(idx), len(class_holders))]
  return fill_empty_clients(owner, num_clients, rng)


def _assign_classes(
    num_clients: int, num_classes: int, classes_per_client: int, rng: np.random.Generator
) -> np.ndarray:
  """``[num_clients, classes_per_client]`` distinct class ids per client.

  The first ``ceil(num_classes / classes_per_client)`` clients take consecutive
  runs of a random class order (wrapping around), which covers every class; the
  other clients draw distinct classes uniformly at random.
  """
  class_order = rng.permutation(num_classes)
  covering = min(num_clients, math.ceil(num_classes / classes_per_client))
  runs = np.arange(covering)[:, None] * classes_per_client + np.arange(classes_per_client)
  first = class_order[runs % num_classes]
  rest = np.argsort(rng.random((num_clients - covering, num_classes)), axis=1)
  return np.concatenate([first, rest[:, :classes_per_client]], axis=0)
