"""Tests of segmentation data: synthetic streets, real loaders on fake trees, partitions."""

import itertools
import os

import numpy as np
import pytest
from PIL import Image

from isr_jax.data import (
    DATASETS,
    SEGMENTATION_DATASETS,
    dominant_class,
    load_dataset,
    partition,
)
from isr_jax.data.camvid import CAMVID_CLASSES
from isr_jax.data.cityscapes import CITYSCAPES_CLASSES, cityscapes_train_ids
from isr_jax.data.street_paints import STREET_CLASSES
from isr_jax.data.street_scenes import generate_street_scenes
from isr_jax.data.street_styles import city_styles
from isr_jax.data.synthia_sf import SYNTHIA_SF_CLASSES
from isr_jax.errors import ConfigError, DataNotFoundError

K = len(STREET_CLASSES)


@pytest.fixture(scope="module")
def streets():
  return load_dataset("synthetic_streets", seed=0, num_train=180, num_test=36)


# ----------------------------------------------------------------------------- synthetic


def test_registry_lists_segmentation_names():
  assert SEGMENTATION_DATASETS == ("synthetic_streets", "cityscapes", "camvid", "synthia_sf")
  assert set(SEGMENTATION_DATASETS) <= set(DATASETS)


def test_synthetic_shapes_dtypes_ranges_and_info(streets):
  train, test, info = streets
  assert info.name == "synthetic_streets" and info.task == "segmentation"
  assert info.source == "synthetic (procedural)" and info.ignore_index == 255
  assert info.num_classes == K >= 8 and info.class_names == STREET_CLASSES
  assert {"road", "sidewalk", "building", "sky", "vegetation", "car", "pedestrian", "pole"} <= set(
      STREET_CLASSES
  )
  assert info.input_shape == (64, 128, 3)
  for split, n in ((train, 180), (test, 36)):
    assert split.x.shape == (n, 64, 128, 3) and split.x.dtype == np.float32
    assert split.y.shape == (n, 64, 128) and split.y.dtype == np.int32
    assert split.groups.shape == (n,) and split.groups.dtype == np.int32
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    assert set(np.unique(split.y)) <= set(range(K)) | {255}
    assert set(np.unique(split.groups)) == set(range(6))  # Same cities in both splits.
  assert not any(np.array_equal(a, b) for a, b in itertools.product(train.x[:5], test.x[:5]))


def test_synthetic_every_class_present(streets):
  train, _, _ = streets
  assert set(np.unique(train.y)) == set(range(K)) | {255}  # 255: the ego hood of some cities.


def test_synthetic_is_seeded():
  a = generate_street_scenes(12, seed=3, image_size=(32, 48))
  b = generate_street_scenes(12, seed=3, image_size=(32, 48))
  c = generate_street_scenes(12, seed=4, image_size=(32, 48))
  for u, v in zip(a, b, strict=True):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[1], c[1])
  assert city_styles(6, 3) == city_styles(6, 3) != city_styles(6, 4)


def test_synthetic_cities_differ(streets):
  train, _, _ = streets
  hist = np.stack([np.bincount(train.y[train.groups == c].ravel(), minlength=256)[:K]
                   for c in range(6)]).astype(float)
  hist /= hist.sum(axis=1, keepdims=True)
  tv = [0.5 * np.abs(hist[i] - hist[j]).sum() for i, j in itertools.combinations(range(6), 2)]
  assert max(tv) > 0.1, tv
  colours = np.stack([train.x[train.groups == c].mean(axis=(0, 1, 2)) for c in range(6)])
  gaps = [np.abs(colours[i] - colours[j]).sum() for i, j in itertools.combinations(range(6), 2)]
  assert max(gaps) > 0.1, colours


def test_synthetic_image_size_and_options():
  train, test, info = load_dataset("synthetic_streets", image_size=(32, 64), num_train=10,
                                   num_test=4, num_cities=3, standardize=True)
  assert train.x.shape == (10, 32, 64, 3) and test.y.shape == (4, 32, 64)
  assert info.input_shape == (32, 64, 3)
  assert set(np.unique(train.groups)) == {0, 1, 2}
  assert set(np.unique(train.y)) <= set(range(K)) | {255}
  assert abs(float(train.x.mean())) < 1e-3  # Standardized, groups kept.


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(image_size=(8, 64)), "dataset.image_size=(8, 64)"),
        (dict(image_size=(32,)), "dataset.image_size=(32,)"),
        (dict(num_cities=0), "dataset.num_cities=0"),
        (dict(num_train=0), "dataset.num_train=0"),
        (dict(bogus=1), "dataset.bogus"),
    ],
)
def test_synthetic_bad_settings(kwargs, expected):
  with pytest.raises(ConfigError) as info:
    load_dataset("synthetic_streets", **{"num_train": 2, "num_test": 2, **kwargs})
  assert expected in str(info.value) and "\n" not in str(info.value)


def test_classification_rejects_options():
  with pytest.raises(ConfigError, match="dataset.num_train is not an option"):
    load_dataset("digits", num_train=3)


# ----------------------------------------------------------------------------- fakes


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _blocks(values, height=8, width=16):
  """A label map of constant 2x2 blocks (survives a nearest 2x downsampling exactly)."""
  small = np.resize(np.asarray(values, np.uint8), (height // 2, width // 2))
  return np.kron(small, np.ones((2, 2), np.uint8))


def _image(index, height=8, width=16):
  """An RGB image whose red channel encodes ``index`` (to check image/label pairing)."""
  rgb = np.full((height, width, 3), 40, np.uint8)
  rgb[..., 0] = 10 * index
  return rgb


def _index_of(x):
  return np.round(x[..., 0].mean(axis=(1, 2)) * 255 / 10).astype(int)


CITYSCAPES_IDS = [7, 26, 0, 33, 5, 11, 24, 255]  # -> 0, 13, 255, 18, 255, 2, 11, 255


@pytest.fixture
def cityscapes_dir(tmp_path):
  index = 0
  for split, cities in (("train", ("aachen", "bochum")), ("val", ("frankfurt",))):
    for city in cities:
      for frame in range(2):
        stem = f"{city}_000000_{frame:06d}"
        _save(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _image(index))
        labels = _blocks(np.roll(CITYSCAPES_IDS, index))
        _save(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", labels)
        index += 1
  return tmp_path


def test_cityscapes_loads_and_maps_ids(cityscapes_dir):
  train, test, info = load_dataset("cityscapes", data_dir=str(cityscapes_dir))
  assert info.num_classes == 19 and info.class_names == CITYSCAPES_CLASSES
  assert info.task == "segmentation" and info.ignore_index == 255
  assert train.x.shape == (4, 8, 16, 3) and test.x.shape == (2, 8, 16, 3)
  assert train.y.dtype == np.int32 and train.x.dtype == np.float32
  np.testing.assert_array_equal(train.groups, [0, 0, 1, 1])  # aachen, bochum
  np.testing.assert_array_equal(test.groups, [2, 2])  # frankfurt
  for split, first in ((train, 0), (test, 4)):
    indices = _index_of(split.x)
    np.testing.assert_array_equal(indices, np.arange(first, first + len(indices)))
    for i, y in zip(indices, split.y, strict=True):
      np.testing.assert_array_equal(y, cityscapes_train_ids(_blocks(np.roll(CITYSCAPES_IDS, i))))
  assert cityscapes_train_ids(np.array([26, 0, 7, 33, 6])).tolist() == [13, 255, 0, 18, 255]
  assert set(np.unique(train.y)) == {0, 2, 11, 13, 18, 255}


def test_cityscapes_resize_keeps_labels(cityscapes_dir):
  train, test, info = load_dataset("cityscapes", data_dir=str(cityscapes_dir), image_size=(4, 8))
  assert train.x.shape == (4, 4, 8, 3) and test.y.shape == (2, 4, 8)
  assert info.input_shape == (4, 8, 3)
  assert set(np.unique(train.y)) <= set(range(19)) | {255}
  for i, y in zip(_index_of(train.x), train.y, strict=True):  # 2x2 blocks -> nearest is exact.
    expected = cityscapes_train_ids(_blocks(np.roll(CITYSCAPES_IDS, i)))[::2, ::2]
    np.testing.assert_array_equal(y, expected)


def test_cityscapes_missing_or_incomplete(tmp_path, cityscapes_dir):
  for data_dir in (None, str(tmp_path / "nowhere"), str(tmp_path / "gtFine")):
    with pytest.raises(DataNotFoundError) as info:
      load_dataset("cityscapes", data_dir=data_dir)
    message = str(info.value)
    assert "leftImg8bit/{train,val}/<city>/" in message and "gtFine_labelIds" in message
    assert "dataset.data_dir" in message and "\n" not in message
  os.remove(cityscapes_dir / "gtFine" / "val" / "frankfurt" /
            "frankfurt_000000_000001_gtFine_labelIds.png")
  with pytest.raises(DataNotFoundError, match="incomplete"):
    load_dataset("cityscapes", data_dir=str(cityscapes_dir))


CAMVID_FILES = {
    "train": ["0001TP_006690", "0001TP_006720", "0006R0_f02370", "0006R0_f02400",
              "0016E5_07959", "0016E5_07961", "Seq05VD_f00000", "Seq05VD_f00030"],
    "val": ["0016E5_07963", "0016E5_07965", "0006R0_f02430"],
    "test": ["Seq05VD_f00060", "0001TP_006750", "0016E5_07967"],
}


@pytest.fixture
def camvid_dir(tmp_path):
  index = 0
  for split, names in CAMVID_FILES.items():
    for name in names:
      _save(tmp_path / split / f"{name}.png", _image(index))
      _save(tmp_path / f"{split}annot" / f"{name}.png", _blocks(np.arange(index, index + 32) % 13))
      index += 1
  return tmp_path


def test_camvid_split_pairs_and_groups(camvid_dir):
  train, test, info = load_dataset("camvid", data_dir=str(camvid_dir), seed=0)
  assert info.num_classes == 11 and info.class_names == CAMVID_CLASSES
  assert len(train.y) == 12 and len(test.y) == 2  # round(600 / 701 * 14) = 12.
  indices = np.concatenate([_index_of(train.x), _index_of(test.x)])
  np.testing.assert_array_equal(np.sort(indices), np.arange(14))  # Pooled, disjoint, complete.
  names = [n for split in CAMVID_FILES.values() for n in split]
  prefixes = sorted({n.split("_")[0] for n in names})
  for split in (train, test):
    for i, y, g in zip(_index_of(split.x), split.y, split.groups, strict=True):
      raw = _blocks(np.arange(i, i + 32) % 13).astype(np.int32)
      np.testing.assert_array_equal(y, np.where(raw <= 10, raw, 255))  # 11 (void), 12 -> 255.
      assert prefixes[g] == names[i].split("_")[0]
  again, _, _ = load_dataset("camvid", data_dir=str(camvid_dir), seed=0)
  other, _, _ = load_dataset("camvid", data_dir=str(camvid_dir), seed=1)
  np.testing.assert_array_equal(train.x, again.x)
  assert not np.array_equal(_index_of(train.x), _index_of(other.x))


def test_camvid_num_train_and_errors(camvid_dir, tmp_path):
  train, test, _ = load_dataset("camvid", data_dir=str(camvid_dir), num_train=9,
                                image_size=(4, 8))
  assert len(train.y) == 9 and len(test.y) == 5 and train.x.shape[1:] == (4, 8, 3)
  assert set(np.unique(train.y)) <= set(range(11)) | {255}
  for bad in (0, 14, 2.5):
    with pytest.raises(ConfigError, match=f"dataset.num_train={bad}"):
      load_dataset("camvid", data_dir=str(camvid_dir), num_train=bad)
  with pytest.raises(DataNotFoundError) as info:
    load_dataset("camvid", data_dir=str(tmp_path / "nowhere"))
  assert "{train,val,test}annot/" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def synthia_dir(tmp_path):
  rng = np.random.default_rng(0)
  index = 0
  for seq in ("SEQ1", "SEQ2"):
    for frame in range(7):
      name = f"{frame:07d}.png"
      _save(tmp_path / seq / "RGBLeft" / name, _image(index))
      gt = rng.integers(0, 256, (8, 16, 3))  # Green and blue: instance ids.
      gt[..., 0] = _blocks(np.arange(index, index + 32) % 25)  # 23, 24: not classes.
      _save(tmp_path / seq / "GTLeft" / name, gt)
      index += 1
  return tmp_path


def test_synthia_sf_red_channel_void_and_split(synthia_dir):
  train, test, info = load_dataset("synthia_sf", data_dir=str(synthia_dir), seed=0)
  assert info.num_classes == 22 and info.class_names == SYNTHIA_SF_CLASSES[1:]
  assert len(test.y) == 4 and len(train.y) == 10  # round(628 / 2224 * 14) = 4.
  np.testing.assert_array_equal(np.bincount(test.groups), [2, 2])  # Every sequence in both.
  np.testing.assert_array_equal(np.bincount(train.groups), [5, 5])
  for split in (train, test):
    for i, y, g in zip(_index_of(split.x), split.y, split.groups, strict=True):
      raw = _blocks(np.arange(i, i + 32) % 25).astype(np.int32)
      np.testing.assert_array_equal(y, np.where((raw >= 1) & (raw <= 22), raw - 1, 255))
      assert g == i // 7
  kept, _, kept_info = load_dataset("synthia_sf", data_dir=str(synthia_dir), void_as_class=True)
  assert kept_info.num_classes == 23 and 0 in np.unique(kept.y)
  assert set(np.unique(kept.y)) <= set(range(23)) | {255}


def test_synthia_sf_sequence_split_and_errors(synthia_dir, tmp_path):
  train, test, _ = load_dataset("synthia_sf", data_dir=str(synthia_dir), test_sequences=(2,),
                                image_size=(4, 8))
  assert set(test.groups) == {1} and set(train.groups) == {0} and len(test.y) == 7
  assert train.x.shape == (7, 4, 8, 3)
  for bad in (("SEQ9",), ("SEQ1", "SEQ2"), ()):
    with pytest.raises(ConfigError, match="dataset.test_sequences"):
      load_dataset("synthia_sf", data_dir=str(synthia_dir), test_sequences=bad)
  with pytest.raises(DataNotFoundError) as info:
    load_dataset("synthia_sf", data_dir=str(tmp_path / "nowhere"))
  assert "SEQ<n>/RGBLeft/" in str(info.value) and "red channel" in str(info.value)


# ----------------------------------------------------------------------------- partitions


def _assert_valid(parts, n, num_clients):
  assert len(parts) == num_clients
  assert all(len(p) > 0 for p in parts)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("num_clients", [1, 2, 4, 5, 6, 7, 13, 40])
def test_natural_partition_exact_cover(num_clients):
  groups = np.repeat([3, 10, 11, 20, 21], [20, 5, 2, 9, 4])  # Uneven; group 11 has 2 examples.
  groups = np.random.default_rng(0).permutation(groups)
  labels = np.zeros((len(groups), 4, 4), np.int32)  # Segmentation maps: only N matters.
  parts = partition(labels, num_clients, "natural", seed=0, groups=groups)
  _assert_valid(parts, len(groups), num_clients)
  per_client = [set(groups[p]) for p in parts]
  if num_clients == 5:
    assert [s.pop() for s in per_client] == [3, 10, 11, 20, 21]  # One client per group.
  elif num_clients > 5:
    assert all(len(s) == 1 for s in per_client)  # Groups are split, never mixed.
    clients_of = np.bincount([np.searchsorted([3, 10, 11, 20, 21], s.pop()) for s in per_client])
    assert clients_of[2] <= 2  # The 2-example group cannot feed more than 2 clients.
  else:
    assert sorted(itertools.chain.from_iterable(per_client)) == [3, 10, 11, 20, 21]  # Merged.
  again = partition(labels, num_clients, "natural", seed=0, groups=groups)
  assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_natural_partition_splits_groups_evenly(streets):
  train, _, _ = streets
  parts = partition(train.y, 12, "natural", seed=1, groups=train.groups)
  _assert_valid(parts, len(train.y), 12)
  assert {len(p) for p in parts} == {15}  # 6 cities x 30 images, 2 clients each.
  other = partition(train.y, 12, "natural", seed=2, groups=train.groups)
  assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_natural_partition_errors():
  with pytest.raises(ConfigError) as info:
    partition(np.zeros(10, np.int32), 2, "natural", seed=0)
  assert "fl.partition.method='natural'" in str(info.value) and "\n" not in str(info.value)
  with pytest.raises(ConfigError, match="groups must be 1-D integer ids"):
    partition(np.zeros(10, np.int32), 2, "natural", seed=0, groups=np.zeros(9, np.int32))
  with pytest.raises(ConfigError, match="num_clients=11 exceeds"):
    partition(np.zeros(10, np.int32), 11, "natural", seed=0, groups=np.arange(10))


def test_dominant_class_hand_made():
  y = np.full((5, 3, 4), 255, np.int32)
  y[0] = [[1, 1, 2, 2], [1, 2, 2, 2], [255, 255, 255, 255]]  # 2 wins (5 vs 3).
  y[1] = [[3, 3, 0, 0], [255] * 4, [255] * 4]  # Tie 0/3 -> smallest id.
  y[2, 0, 0] = 7  # One labelled pixel among ignored ones.
  # y[3] stays all-ignored -> 0.
  y[4] = 4
  y[4, 0, :3] = 9
  np.testing.assert_array_equal(dominant_class(y), [2, 0, 7, 0, 4])
  assert dominant_class(y).dtype == np.int64
  np.testing.assert_array_equal(dominant_class(y[:2], ignore_index=None), [2, 255])
  parts = partition(dominant_class(y), 2, "dirichlet", seed=0, concentration=0.5)
  _assert_valid(parts, 5, 2)
  with pytest.raises(ConfigError, match="dominant_class"):
    dominant_class(np.zeros(5, np.int32))
