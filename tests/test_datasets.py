"""Tests of isr_jax.data.datasets (digits, IDX Fashion-MNIST, TFDS) and pack_clients."""

import gzip
import io
import json
import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from isr_jax.data import (
    DATASETS,
    FASHION_MNIST_DIR,
    ArraySplit,
    load_dataset,
    pack_clients,
    partition,
)
from isr_jax.data.datasets import read_idx
from isr_jax.errors import ConfigError, DataNotFoundError

# ----------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_range():
  train, test, info = load_dataset("digits")
  assert info.name == "digits" and info.num_classes == 10 and info.input_shape == (8, 8, 1)
  assert info.source == "scikit-learn"
  assert train.x.shape == (1437, 8, 8, 1) and test.x.shape == (360, 8, 8, 1)
  assert train.x.dtype == np.float32 and test.x.dtype == np.float32
  assert train.y.dtype == np.int32 and test.y.dtype == np.int32
  assert train.x.min() == 0.0 and train.x.max() == 1.0
  assert set(np.unique(train.y)) == set(range(10)) == set(np.unique(test.y))


def test_digits_split_is_stratified_and_seeded():
  train, test, _ = load_dataset("digits", seed=0, test_fraction=0.25)
  all_counts = np.bincount(np.concatenate([train.y, test.y]), minlength=10)
  test_counts = np.bincount(test.y, minlength=10)
  assert len(test.y) == 450
  assert np.all(np.abs(test_counts - 0.25 * all_counts) <= 1)  # Stratified.
  again, _, _ = load_dataset("digits", seed=0, test_fraction=0.25)
  other, _, _ = load_dataset("digits", seed=1, test_fraction=0.25)
  np.testing.assert_array_equal(train.x, again.x)
  np.testing.assert_array_equal(train.y, again.y)
  assert not np.array_equal(train.x, other.x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 0.001])
def test_bad_test_fraction(fraction):
  with pytest.raises(ConfigError, match=f"dataset.test_fraction={fraction}"):
    load_dataset("digits", test_fraction=fraction)


@pytest.mark.parametrize("name", ["foo", "emnist/nope", "fashion-mnist"])
def test_unknown_name(name):
  with pytest.raises(ConfigError) as info:
    load_dataset(name)
  message = str(info.value)
  assert f"dataset.name={name!r}" in message and "\n" not in message
  if name != "emnist/nope":
    assert all(n in message for n in DATASETS)


def test_standardize_uses_train_statistics():
  raw_train, raw_test, _ = load_dataset("digits")
  train, test, _ = load_dataset("digits", standardize=True)
  assert train.x.dtype == np.float32
  assert abs(train.x.mean()) < 1e-5 and abs(train.x.std() - 1.0) < 1e-4
  mean, std = raw_train.x.mean(dtype=np.float64), raw_train.x.std(dtype=np.float64)
  np.testing.assert_allclose(test.x, (raw_test.x - mean) / std, atol=1e-5)
  np.testing.assert_array_equal(test.y, raw_test.y)


# ----------------------------------------------------------------------- fashion_mnist


def _idx_bytes(array):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_gz(path, data):
  with gzip.open(path, "wb") as f:
    f.write(data)


def _write_fashion_mnist(directory, n_train=12, n_test=5):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    _write_gz(directory / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(images))
    _write_gz(directory / f"{prefix}-labels-idx1-ubyte.gz", _idx_bytes(labels))
    arrays[prefix] = (images, labels)
  return arrays


def test_fashion_mnist_reads_idx_files(tmp_path):
  arrays = _write_fashion_mnist(tmp_path)
  train, test, info = load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert info.num_classes == 10 and info.input_shape == (28, 28, 1)
  assert info.source == str(tmp_path)
  assert train.x.shape == (12, 28, 28, 1) and test.x.shape == (5, 28, 28, 1)
  assert train.x.dtype == np.float32 and train.y.dtype == np.int32
  np.testing.assert_allclose(train.x[..., 0] * 255.0, arrays["train"][0], atol=1e-4)
  np.testing.assert_array_equal(test.y, arrays["t10k"][1])
  assert train.x.min() >= 0.0 and train.x.max() <= 1.0


@pytest.mark.parametrize(
    ("corruption", "expected"),
    [
        ("truncate_data", "truncated or corrupt"),
        ("extra_data", "truncated or corrupt"),
        ("truncate_gzip", "not a readable gzip file"),
        ("not_gzip", "not a readable gzip file"),
        ("bad_magic", "bad magic number"),
        ("bad_dtype", "dtype code 0x0d"),
        ("short_header", "truncated IDX header"),
    ],
)
def test_fashion_mnist_corrupt_file_names_the_file(tmp_path, corruption, expected):
  _write_fashion_mnist(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte.gz"
  good = _idx_bytes(np.zeros((12, 28, 28), np.uint8))
  if corruption == "truncate_data":
    _write_gz(path, good[:-100])
  elif corruption == "extra_data":
    _write_gz(path, good + b"\x00")
  elif corruption == "truncate_gzip":
    path.write_bytes(path.read_bytes()[:40])
  elif corruption == "not_gzip":
    path.write_bytes(good)
  elif corruption == "bad_magic":
    _write_gz(path, b"\x01" + good[1:])
  elif corruption == "bad_dtype":
    _write_gz(path, good[:2] + b"\x0d" + good[3:])
  else:
    _write_gz(path, good[:9])
  with pytest.raises(ConfigError) as info:
    load_dataset("fashion_mnist", data_dir=str(tmp_path))
  message = str(info.value)
  assert str(path) in message and expected in message and "\n" not in message


def test_fashion_mnist_mismatched_counts(tmp_path):
  _write_fashion_mnist(tmp_path)
  _write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", _idx_bytes(np.zeros(4, np.uint8)))
  with pytest.raises(ConfigError, match="t10k-labels-idx1-ubyte.gz"):
    load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_fashion_mnist_missing_dir(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataNotFoundError) as info:
    load_dataset("fashion_mnist", data_dir=str(missing))
  message = str(info.value)
  assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
  assert "dataset.data_dir" in message and "\n" not in message


def test_read_idx_shape(tmp_path):
  path = tmp_path / "x.gz"
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  _write_gz(path, _idx_bytes(array))
  np.testing.assert_array_equal(read_idx(str(path)), array)


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="Debian package dataset-fashion-mnist absent"
)
def test_fashion_mnist_debian_package():
  train, test, info = load_dataset("fashion_mnist")
  assert train.x.shape == (60_000, 28, 28, 1) and test.x.shape == (10_000, 28, 28, 1)
  assert np.array_equal(np.bincount(train.y), np.full(10, 6000))
  assert info.source == FASHION_MNIST_DIR


# -------------------------------------------------------------------------------- tfds


@pytest.mark.parametrize(
    ("name", "num_classes", "shape"),
    [
        ("mnist", 10, (28, 28, 1)),
        ("fashion_mnist_tfds", 10, (28, 28, 1)),
        ("cifar10", 10, (32, 32, 3)),
        ("cifar100", 100, (32, 32, 3)),
        ("svhn_cropped", 10, (32, 32, 3)),
        ("emnist", 47, (28, 28, 1)),
        ("emnist/letters", 37, (28, 28, 1)),
    ],
)
def test_tfds_datasets_under_mock_data(mock_tfds, name, num_classes, shape):
  with mock_tfds(num_examples=12):
    train, test, info = load_dataset(name, data_dir="/nonexistent/tfds")
  assert info.name == name and info.num_classes == num_classes and info.input_shape == shape
  assert info.source.startswith("tfds:")
  for split in (train, test):
    assert split.x.shape == (12, *shape) and split.x.dtype == np.float32
    assert split.y.shape == (12,) and split.y.dtype == np.int32
    assert split.x.min() >= 0.0 and split.x.max() <= 1.0 and split.x.max() > 0.5
    assert split.y.min() >= 0 and split.y.max() < num_classes


def test_tfds_standardize_per_channel(mock_tfds):
  with mock_tfds(num_examples=40):
    train, _, _ = load_dataset("cifar10", standardize=True)
  np.testing.assert_allclose(train.x.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(train.x.std(axis=(0, 1, 2)), 1.0, atol=1e-4)


def _png(image):
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0]).save(buffer, format="PNG")
  return buffer.getvalue()


class _TinyMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a few examples in the on-disk layout of TFDS ``mnist`` (ArrayRecord)."""

  name = "mnist"
  VERSION = tfds.core.Version("3.0.1")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(30), "test": self._generate_examples(10)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      image = np.full((28, 28, 1), 25 * (i % 10), np.uint8)
      image[0, 0, 0] = rng.integers(256)
      # PNG bytes pass through tfds unencoded, so no TensorFlow is needed.
      yield i, {"image": _png(image), "label": i % 10}


@pytest.fixture(scope="module")
def prepared_mnist_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  _TinyMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_reads_real_array_record_files(prepared_mnist_dir):
  train, test, info = load_dataset("mnist", data_dir=str(prepared_mnist_dir))
  assert train.x.shape == (30, 28, 28, 1) and test.x.shape == (10, 28, 28, 1)
  assert info.num_classes == 10 and str(prepared_mnist_dir) in info.source
  np.testing.assert_array_equal(np.bincount(train.y), np.full(10, 3))
  # Pixel (1, 1) was written as 25 * label: records decode to the right label.
  np.testing.assert_allclose(train.x[:, 1, 1, 0] * 255.0, 25.0 * train.y, atol=1e-3)


def test_tfds_missing_data_says_how_to_prepare(tmp_path):
  with pytest.raises(DataNotFoundError) as info:
    load_dataset("cifar10", data_dir=str(tmp_path))
  message = str(info.value)
  assert str(tmp_path / "cifar10") in message and "not found" in message
  assert "tfds build cifar10 --file_format=array_record" in message
  assert "dataset.data_dir" in message and "\n" not in message
  assert os.listdir(tmp_path) == []  # Nothing was downloaded or prepared.


def test_tfds_default_data_dir_without_the_data_says_how_to_prepare(tmp_path, monkeypatch, caplog):
  # With no dataset.data_dir, tfds 4.9's data_source fails with KeyError("... `splits`
  # is empty ...") instead of its not-prepared error.
  from tensorflow_datasets.core import constants

  monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path))
  with pytest.raises(DataNotFoundError) as info:
    load_dataset("cifar10")
  message = str(info.value)
  assert message.startswith(f"tfds cifar10 not found in {tmp_path / 'cifar10'}")
  assert "(dataset.data_dir unset)" in message and "\n" not in message
  assert "'tfds build cifar10 --file_format=array_record --data_dir=DIR'" in message
  assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_tfds_tfrecord_data_says_array_record_is_needed(prepared_mnist_dir, tmp_path):
  data_dir = tmp_path / "copy"
  os.makedirs(data_dir / "mnist" / "3.0.1")
  for file in os.listdir(prepared_mnist_dir / "mnist" / "3.0.1"):
    src = prepared_mnist_dir / "mnist" / "3.0.1" / file
    (data_dir / "mnist" / "3.0.1" / file).write_bytes(src.read_bytes())
  info_path = data_dir / "mnist" / "3.0.1" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(DataNotFoundError, match="in tfrecord format .* needs array_record"):
    load_dataset("mnist", data_dir=str(data_dir))


# ------------------------------------------------------------------------------ packing


def test_pack_clients_round_trip_with_ragged_last_batch():
  train, _, _ = load_dataset("digits")
  x, y = train.x[:22], train.y[:22]
  parts = partition(y, 3, "iid", seed=0)
  assert [len(p) for p in parts] == [8, 7, 7]
  packed = pack_clients(x, y, parts, batch_size=3)
  assert packed.x.shape == (3, 3, 3, 8, 8, 1) and packed.y.shape == (3, 3, 3)
  assert packed.mask.shape == (3, 3, 3) and packed.num_clients == 3
  assert packed.steps_per_epoch == 3 and packed.batch_size == 3
  np.testing.assert_array_equal(packed.num_examples, [8, 7, 7])
  for i, ix in enumerate(parts):
    flat_mask = packed.mask[i].reshape(-1)
    np.testing.assert_array_equal(flat_mask, np.arange(9) < len(ix))  # Real examples first.
    np.testing.assert_array_equal(packed.x[i].reshape(9, 8, 8, 1)[: len(ix)], x[ix])  # In order.
    np.testing.assert_array_equal(packed.y[i].reshape(9)[: len(ix)], y[ix])
    assert not packed.x[i].reshape(9, -1)[len(ix) :].any()
  assert isinstance(train, ArraySplit)
