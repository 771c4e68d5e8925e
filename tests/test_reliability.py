"""A run a researcher can leave alone: resume checks, damaged files, full disks, finished runs."""

import gzip
import struct

import numpy as np
import pytest

from isr_jax.data import load_dataset
from isr_jax.errors import ConfigError


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


@pytest.mark.parametrize(
    "train_labels,num_test,message",
    [
        ([0] * 20, 5, r"every training label of dataset\.name='fashion_mnist' is class 0"),
        (list(range(10)) * 2, 0, r"dataset\.name='fashion_mnist' has an empty test split: "
         r"check the files it was read from \("),
    ],
)
def test_one_class_or_empty_splits_blame_the_data(tmp_path, train_labels, num_test, message):
  rng = np.random.default_rng(0)
  n = len(train_labels)
  write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels)
  write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (num_test, 28, 28)))
  write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", [1] * num_test)
  with pytest.raises(ConfigError, match=message) as info:
    load_dataset("fashion_mnist", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)
