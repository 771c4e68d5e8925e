"""Holding examples out of federated training: the cloud's IID share (hybrid
CL-FL mode) and each client's own test examples (personalized FL)."""

from __future__ import annotations

import numpy as np

from isr_jax.errors import ConfigError


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
