"""Tests of isr_jax.data.partition: exact cover, determinism, skew and error messages."""


import functools

import numpy as np
import pytest

from isr_jax.data import PARTITIONS, partition, split_cloud
from isr_jax.errors import ConfigError


def _labels(n, num_classes=10, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n)


def _assert_valid(parts, n, num_clients):
  assert len(parts) == num_clients
  assert all(len(p) > 0 for p in parts), "a client is empty"
  assert all(np.all(np.diff(p) > 0) for p in parts), "indices not sorted or duplicated"
  joined = np.concatenate(parts)
  assert joined.dtype == np.int64
  np.testing.assert_array_equal(np.sort(joined), np.arange(n))  # Exact cover, no duplicates.


def _distinct_classes(labels, parts):
  return np.array([len(np.unique(labels[p])) for p in parts])


@pytest.mark.parametrize("method", PARTITIONS)
@pytest.mark.parametrize(("n", "num_clients", "seed"), [(1000, 10, 0), (1000, 37, 3), (503, 50, 7)])
def test_exact_cover_every_method(method, n, num_clients, seed):
  labels = _labels(n, seed=seed)
  parts = partition(labels, num_clients, method, seed=seed, concentration=0.1)
  _assert_valid(parts, n, num_clients)


@pytest.mark.parametrize("method", PARTITIONS)
def test_one_client_gets_everything(method):
  labels = _labels(50)
  (only,) = partition(labels, 1, method, seed=0, shards_per_client=3)
  np.testing.assert_array_equal(only, np.arange(50))


@pytest.mark.parametrize("method", PARTITIONS)
def test_as_many_clients_as_examples(method):
  labels = _labels(40, num_classes=4)
  parts = partition(labels, 40, method, seed=1, shards_per_client=1, concentration=0.05)
  _assert_valid(parts, 40, 40)
  assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize("method", PARTITIONS)
def test_seeded_determinism(method):
  labels = _labels(2000)
  a = partition(labels, 20, method, seed=5)
  b = partition(labels, 20, method, seed=5)
  c = partition(labels, 20, method, seed=6)
  assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_sizes_are_even():
  parts = partition(_labels(1003), 10, "iid", seed=0)
  assert sorted({len(p) for p in parts}) == [100, 101]


def test_dirichlet_small_alpha_is_skewed():
  labels = _labels(10_000)
  iid = _distinct_classes(labels, partition(labels, 100, "iid", seed=0))
  dirichlet = functools.partial(partition, labels, 100, "dirichlet", seed=0)
  skewed = _distinct_classes(labels, dirichlet(concentration=0.05))
  mild = _distinct_classes(labels, dirichlet(concentration=100.0))
  assert iid.mean() > 9.5
  assert skewed.mean() < 3.0
  assert mild.mean() > 9.0


@pytest.mark.parametrize("n", [60_000, 1_500])
def test_dirichlet_thousand_clients_tiny_alpha_terminates(n):
  # No resample-until-lucky loop: a single pass, whatever α and the client count.
  labels = _labels(n)
  _assert_valid(partition(labels, 1000, "dirichlet", seed=0, concentration=0.01), n, 1000)


def test_dirichlet_single_class_labels():
  labels = np.zeros(30, np.int64)
  _assert_valid(partition(labels, 7, "dirichlet", seed=0, concentration=0.01), 30, 7)


def test_shards_give_few_labels_per_client():
  labels = np.repeat(np.arange(10), 600)  # 6000 examples, 600 per class, like MNIST / 10.
  parts = partition(labels, 100, "shards", seed=0, shards_per_client=2)
  _assert_valid(parts, 6000, 100)
  assert all(len(p) == 60 for p in parts)  # 200 shards of 30, two each.
  assert _distinct_classes(labels, parts).max() <= 2


def test_shards_bound_with_unbalanced_labels():
  labels = _labels(5000)
  for shards in (1, 2, 3):
    parts = partition(labels, 50, "shards", seed=0, shards_per_client=shards)
    _assert_valid(parts, 5000, 50)
    assert _distinct_classes(labels, parts).max() <= 2 * shards


@pytest.mark.parametrize(("num_clients", "classes_per_client"), [(10, 1), (5, 2), (20, 3), (7, 10)])
def test_pathological_exact_classes_when_feasible(num_clients, classes_per_client):
  labels = _labels(3000)
  parts = partition(
      labels, num_clients, "pathological", seed=0, classes_per_client=classes_per_client
  )
  _assert_valid(parts, 3000, num_clients)
  assert np.all(_distinct_classes(labels, parts) == classes_per_client)


def test_pathological_covers_unheld_classes():
  labels = _labels(3000)
  parts = partition(labels, 3, "pathological", seed=0, classes_per_client=2)  # 6 of 10 held.
  _assert_valid(parts, 3000, 3)
  counts = _distinct_classes(labels, parts)
  assert counts.sum() == 10  # Each unheld class went whole to one client.
  assert counts.min() >= 2


def test_pathological_many_clients_few_examples_never_empty():
  labels = _labels(1500)
  parts = partition(labels, 1000, "pathological", seed=0, classes_per_client=2)
  _assert_valid(parts, 1500, 1000)


def test_errors_name_the_setting():
  labels = _labels(300)
  cases = [
      (dict(num_clients=0, method="iid"), "num_clients=0"),
      (dict(num_clients=301, method="iid"), "num_clients=301"),
      (dict(num_clients=5, method="nope"), "partition.method='nope'"),
      (dict(num_clients=5, method="dirichlet", concentration=0.0), "dirichlet_alpha=0.0"),
      (dict(num_clients=5, method="dirichlet", concentration=-1.0), "dirichlet_alpha=-1.0"),
      (dict(num_clients=5, method="shards", shards_per_client=0), "partition.shards_per_client"),
      (dict(num_clients=100, method="shards", shards_per_client=5), "partition.shards_per_client"),
      (dict(num_clients=5, method="pathological", classes_per_client=0), "classes_per_client=0"),
      (dict(num_clients=5, method="pathological", classes_per_client=11), "classes_per_client=11"),
  ]
  for kwargs, expected in cases:
    with pytest.raises(ConfigError) as info:
      partition(labels, seed=0, **kwargs)
    message = str(info.value)
    assert expected in message, message
    assert "\n" not in message
  with pytest.raises(ConfigError, match="needs 500 shards but only 300 examples"):
    partition(labels, 100, "shards", seed=0, shards_per_client=5)
  with pytest.raises(ConfigError, match="'iid', 'dirichlet', 'shards', 'pathological'"):
    partition(labels, 5, "nope", seed=0)
  with pytest.raises(ConfigError, match="1-D integer"):
    partition(np.zeros((10, 2), np.int32), 2, "iid", seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 0.99])
def test_split_cloud_exact_cover(fraction):
  cloud, rest = split_cloud(1000, fraction, seed=0)
  assert len(cloud) == round(fraction * 1000)
  assert len(rest) > 0
  assert np.all(np.diff(cloud) > 0) and np.all(np.diff(rest) > 0)
  np.testing.assert_array_equal(np.sort(np.concatenate([cloud, rest])), np.arange(1000))
  again, _ = split_cloud(1000, fraction, seed=0)
  np.testing.assert_array_equal(cloud, again)


def test_split_cloud_zero_is_empty_and_seeds_differ():
  cloud, rest = split_cloud(10, 0.0, seed=0)
  assert cloud.size == 0 and cloud.dtype == np.int64
  np.testing.assert_array_equal(rest, np.arange(10))
  a, _ = split_cloud(100, 0.3, seed=0)
  b, _ = split_cloud(100, 0.3, seed=1)
  assert not np.array_equal(a, b)
  assert len(split_cloud(3, 0.9, seed=0)[1]) == 1  # Clients always keep one example.


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_cloud_bad_fraction(fraction):
  with pytest.raises(ConfigError, match=f"cloud_fraction={fraction} must be in"):
    split_cloud(100, fraction, seed=0)
