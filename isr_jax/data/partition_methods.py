"""The owner array (the client of every example) of each method of
:func:`isr_jax.data.partition.partition`, and the helpers that build, repair and
group owner arrays."""

from __future__ import annotations

import math

import numpy as np

from isr_jax.errors import ConfigError


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


def iid_owner(n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
  owner = np.empty(n, np.int64)
  owner[rng.permutation(n)] = _even_owner(n, num_clients)
  return owner


def natural_owner(
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


def dirichlet_owner(
    labels: np.ndarray, num_clients: int, concentration: float, rng: np.random.Generator
) -> np.ndarray:
  if not concentration > 0:  # Also rejects NaN.
    raise ConfigError(f"fl.partition.dirichlet_alpha={concentration} must be > 0")
  owner = np.empty(len(labels), np.int64)
  prior = np.full(num_clients, float(concentration))
  for idx in _class_indices(labels):
    idx = rng.permutation(idx)
    p = rng.dirichlet(prior)
    if not (np.all(np.isfinite(p)) and p.sum() > 0):  # Underflow guard for a tiny concentration.
      p = np.eye(num_clients)[rng.integers(num_clients)]
    cuts = np.minimum(np.round(np.cumsum(p) * len(idx)).astype(np.int64), len(idx))
    cuts[-1] = len(idx)
    owner[idx] = np.repeat(np.arange(num_clients), np.diff(cuts, prepend=0))
  return fill_empty_clients(owner, num_clients, rng)


def shards_owner(
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


def pathological_owner(
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
