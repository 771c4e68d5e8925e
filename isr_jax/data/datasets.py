"""Image datasets loaded fully into memory as numpy arrays.

Classification comes from three sources, none of which downloads anything (the
machines this runs on may have no internet):

* ``"digits"``: scikit-learn's bundled 8x8 digits, with a seeded stratified
  train/test split.
* ``"fashion_mnist"``: the gzipped IDX files of Fashion-MNIST read from a
  directory (by default where the Debian package ``dataset-fashion-mnist``
  installs them).
* TFDS datasets (``"mnist"``, ``"cifar10"``, ...): read through the random-access
  ``tfds.data_source`` API, which works without TensorFlow but needs the data
  prepared in the ArrayRecord format beforehand.

Every loader returns images as float32 NHWC scaled to ``[0, 1]`` and labels as
int32.

Semantic segmentation (:data:`~isr_jax.data.types.SEGMENTATION_DATASETS`: synthetic street scenes,
Cityscapes, CamVid, SYNTHIA-SF) is loaded by :mod:`isr_jax.data.segmentation`
through the same :func:`load_dataset`; its labels are ``[N, H, W]`` with
``DatasetInfo.ignore_index`` (255) for unlabelled pixels, and ``ArraySplit.groups``
holds the city or sequence of every image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import logging
import math
import os
import struct

import numpy as np

from isr_jax.data.segmentation import load_segmentation
from isr_jax.data.types import SEGMENTATION_DATASETS, ArraySplit, DatasetInfo
from isr_jax.errors import ConfigError, DataNotFoundError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# Names accepted by `load_dataset` that are read through TFDS -> TFDS dataset names.
_TFDS_NAMES = {
    "mnist": "mnist",
    "fashion_mnist_tfds": "fashion_mnist",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "svhn_cropped": "svhn_cropped",
    "emnist": "emnist/balanced",
}

EMNIST_CONFIGS = ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")
"""Configs of TFDS ``emnist`` accepted as ``"emnist/<config>"``."""

DATASETS: tuple[str, ...] = ("digits", "fashion_mnist", *_TFDS_NAMES, *SEGMENTATION_DATASETS)
"""Names accepted by :func:`load_dataset` (plus ``"emnist/<config>"``)."""

_READ_CHUNK = 8192  # Records fetched per batched read from a TFDS data source.


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    standardize: bool = False,
    image_size: tuple[int, int] | None = None,
    **options,
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Loads a dataset's train and test splits into memory.

  Args:
    name: one of :data:`DATASETS`, or ``"emnist/<config>"`` with a config from
      :data:`EMNIST_CONFIGS` (``"emnist"`` is ``"emnist/balanced"``).
    data_dir: where to read the data: the IDX directory for ``"fashion_mnist"``
      (default :data:`FASHION_MNIST_DIR`), the TFDS data directory for TFDS
      datasets (default: TFDS's own, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``), the dataset root for Cityscapes, CamVid and
      SYNTHIA-SF. Ignored for ``"digits"`` and ``"synthetic_streets"``.
    seed: seed of the train/test split of ``"digits"``, CamVid and SYNTHIA-SF
      and of the synthetic street scenes (the other datasets have official
      splits and ignore it).
    test_fraction: fraction of ``"digits"`` held out for testing, in ``(0, 1)``.
    standardize: if True, subtract the per-channel mean and divide by the
      per-channel standard deviation, both computed on the train split, from
      both splits.
    image_size: ``(H, W)`` that segmentation images are resized to (images
      bilinearly, labels by nearest neighbour); ignored for classification.
    **options: dataset-specific options of a segmentation dataset, see
      :func:`isr_jax.data.segmentation.load_segmentation`.

  Returns:
    ``(train, test, info)``.

  Raises:
    ConfigError: unknown name or option, bad ``test_fraction`` (digits) or
      ``image_size``, or corrupt data files.
    DataNotFoundError: the data is not in ``data_dir``; the message says how to
      get it.
  """
  if options and name not in SEGMENTATION_DATASETS:
    raise ConfigError(
        f"dataset.{sorted(options)[0]} is not an option of dataset.name={name!r} (only "
        f"segmentation datasets take options)"
    )
  if name in SEGMENTATION_DATASETS:

    train, test, info = load_segmentation(
        name, data_dir=data_dir, seed=seed, image_size=image_size, **options
    )
  elif name == "digits":
    train, test, info = _load_digits(seed=seed, test_fraction=test_fraction)
  elif name == "fashion_mnist":
    train, test, info = _load_fashion_mnist(data_dir or FASHION_MNIST_DIR)
  else:
    train, test, info = _load_tfds(name, tfds_name(name), data_dir)
  _check_splits(name, train, test, info)
  if standardize:
    train, test = standardize_splits(train, test)
  return train, test, info


# The setting that decides the size of a dataset's test split, for error messages.
_TEST_SPLIT_SETTINGS = {
    "digits": "dataset.test_fraction",
    "synthetic_streets": "dataset.num_test",
    "synthia_sf": "dataset.test_sequences",
}


def _check_splits(name: str, train: ArraySplit, test: ArraySplit, info: DatasetInfo) -> None:
  """Refuses splits that cannot train or evaluate, blaming the setting or files behind them.

  Without this an empty split surfaces later as an empty client ("lower
  num_clients"), and a train split of one class trains silently to a constant.
  """
  for split, data in (("train", train), ("test", test)):
    if len(data.y) == 0:
      cause = (_TEST_SPLIT_SETTINGS.get(name) if split == "test" else None) or \
          f"the files it was read from ({info.source}; set dataset.data_dir)"
      raise ConfigError(f"dataset.name={name!r} has an empty {split} split: check {cause}")
  if info.task == "classification":
    classes = np.unique(train.y)
    if len(classes) < 2:
      raise ConfigError(
          f"every training label of dataset.name={name!r} is class {int(classes[0])}: nothing "
          f"to learn — check the files it was read from ({info.source}; set dataset.data_dir)")


def tfds_name(name: str) -> str:
  """Maps a :func:`load_dataset` name to the TFDS dataset name it reads.

  Args:
    name: a TFDS-backed name from :data:`DATASETS` or ``"emnist/<config>"``.

  Returns:
    The TFDS name, e.g. ``"emnist/balanced"`` for ``"emnist"``.

  Raises:
    ConfigError: the name is not known.
  """
  if name in _TFDS_NAMES:
    return _TFDS_NAMES[name]
  if name.startswith("emnist/"):
    config = name.split("/", 1)[1]
    if config not in EMNIST_CONFIGS:
      raise ConfigError(
          f"dataset.name={name!r}: EMNIST config {config!r} is not one of {list(EMNIST_CONFIGS)}"
      )
    return name
  raise ConfigError(
      f"dataset.name={name!r} is not one of {list(DATASETS)} (or 'emnist/<config>')"
  )


def dataset_source(name: str) -> str:
  """Where :func:`load_dataset` reads ``name`` from, and how to get it there."""
  if name == "digits":
    return "scikit-learn's 8x8 digits (bundled, nothing to prepare)"
  if name == "fashion_mnist":
    return f"IDX files in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
  if name == "synthetic_streets":
    return "generated street scenes (nothing to prepare)"
  if name in SEGMENTATION_DATASETS:
    return "the dataset's own files in dataset.data_dir"
  return f"TFDS, prepared once with '{tfds_prepare_command(tfds_name(name))}'"


def standardize_splits(train: ArraySplit, test: ArraySplit) -> tuple[ArraySplit, ArraySplit]:
  """Standardizes both splits per channel with the train split's statistics.

  Channels whose train standard deviation is (near) zero are only centred.

  Args:
    train: the split the mean and standard deviation are computed on.
    test: a split standardized with the train statistics.

  Returns:
    ``(train, test)`` standardized, float32.
  """
  mean, std = channel_stats(train.x)
  mean = mean.astype(np.float32)
  std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
  return (
      dataclasses.replace(train, x=((train.x - mean) / std).astype(np.float32)),
      dataclasses.replace(test, x=((test.x - mean) / std).astype(np.float32)),
  )


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of NHWC images, in float64.

  Accumulates over chunks of examples so that no float64 copy of the whole array
  is made.

  Args:
    x: images ``[N, H, W, C]``.
    chunk: examples per accumulation step.

  Returns:
    ``(mean, std)``, each ``[C]`` float64.
  """
  channels = x.shape[-1]
  total = np.zeros(channels)
  total_sq = np.zeros(channels)
  for start in range(0, len(x), chunk):
    block = x[start : start + chunk].reshape(-1, channels).astype(np.float64)
    total += block.sum(axis=0)
    total_sq += np.square(block).sum(axis=0)
  count = x.size // channels
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  return mean, np.sqrt(var)


def _load_digits(*, seed: int, test_fraction: float) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """scikit-learn's 8x8 digits (bundled with the wheel) with a stratified split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  if not 0.0 < test_fraction < 1.0:
    raise ConfigError(f"dataset.test_fraction={test_fraction} must be in (0, 1)")
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]
  y = digits.target.astype(np.int32)
  num_classes = int(y.max()) + 1
  num_test = math.ceil(test_fraction * len(y))
  if min(num_test, len(y) - num_test) < num_classes:
    raise ConfigError(
        f"dataset.test_fraction={test_fraction} leaves fewer than {num_classes} examples "
        f"(one per class) in the digits train or test split; use a value in [0.01, 0.99]"
    )
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=seed, stratify=y
  )
  info = DatasetInfo("digits", num_classes, x.shape[1:], "scikit-learn")
  return ArraySplit(x_train, y_train), ArraySplit(x_test, y_test), info


def read_idx(path: str) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes, strictly.

  The IDX format is two zero bytes, a dtype code (only ``0x08``, unsigned byte,
  is accepted), the number of dimensions, each dimension as a big-endian uint32,
  and then exactly ``prod(dims)`` bytes of data.

  Args:
    path: path to a ``*.gz`` IDX file.

  Returns:
    A uint8 array of the shape given in the header.

  Raises:
    ConfigError: the file is not gzip, is truncated, or has a bad header or size.
  """
  fix = "re-download it (Debian package dataset-fashion-mnist) or set dataset.data_dir"
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as err:
    reason = " ".join(str(err).split()) or type(err).__name__
    raise ConfigError(f"{path} is not a readable gzip file ({reason}): {fix}") from err
  if len(raw) < 4 or raw[:2] != b"\x00\x00":
    raise ConfigError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}): {fix}")
  if raw[2] != 0x08:
    raise ConfigError(
        f"{path} has IDX dtype code 0x{raw[2]:02x} but only 0x08 (unsigned byte) is supported: "
        f"{fix}"
    )
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise ConfigError(f"{path} has a truncated IDX header ({ndim} dims, {len(raw)} bytes): {fix}")
  dims = struct.unpack(f">{ndim}I", raw[4:header])
  expected = math.prod(dims)
  if len(raw) - header != expected:
    raise ConfigError(
        f"{path} is truncated or corrupt: its IDX header says {'x'.join(map(str, dims))} = "
        f"{expected} bytes of data but it holds {len(raw) - header}: {fix}"
    )
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_fashion_mnist(data_dir: str) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Fashion-MNIST from the four gzipped IDX files in ``data_dir``."""
  for files in _FASHION_MNIST_FILES.values():
    for file in files:
      if not os.path.isfile(os.path.join(data_dir, file)):
        raise DataNotFoundError(
            f"Fashion-MNIST IDX files not found in {data_dir} (no {file}): install them with "
            f"'apt-get install dataset-fashion-mnist' or set dataset.data_dir"
        )
  splits = {}
  for split, (image_file, label_file) in _FASHION_MNIST_FILES.items():
    image_path = os.path.join(data_dir, image_file)
    label_path = os.path.join(data_dir, label_file)
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
      raise ConfigError(
          f"{image_path} ({images.shape}) and {label_path} ({labels.shape}) are not [N, H, W] "
          f"images with [N] labels: re-download them or set dataset.data_dir"
      )
    if labels.size and labels.max() >= 10:
      raise ConfigError(
          f"{label_path} holds label {int(labels.max())} but Fashion-MNIST has 10 classes: "
          f"re-download it or set dataset.data_dir"
      )
    x = (images.astype(np.float32) / 255.0)[..., None]
    splits[split] = ArraySplit(x, labels.astype(np.int32))
  info = DatasetInfo("fashion_mnist", 10, splits["train"].x.shape[1:], data_dir)
  return splits["train"], splits["test"], info


def _load_tfds(
    name: str, tfds_dataset: str, data_dir: str | None
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Reads the train and test splits of a prepared TFDS dataset (no TensorFlow needed)."""
  import tensorflow_datasets as tfds

  splits = {}
  for split in ("train", "test"):
    try:
      # download=False: tfds.data_source would otherwise try to download and prepare.
      with _quiet_tfds():
        source = tfds.data_source(tfds_dataset, split=split, data_dir=data_dir, download=False)
    except (NotImplementedError, FileNotFoundError, KeyError) as err:
      # Unprepared data surfaces as NotImplementedError("... FileFormat.TFRECORD ...") in
      # an empty data_dir, as KeyError("... `splits` is empty ...") in TFDS's default one.
      raise _tfds_not_found(tfds_dataset, data_dir, split) from err
    splits[split] = _read_source(source)
  features = source.dataset_info.features
  num_classes = int(features["label"].num_classes)
  for split, data in splits.items():
    if data.y.min() < 0 or data.y.max() >= num_classes:
      raise ConfigError(
          f"tfds {tfds_dataset} {split} split has labels outside [0, {num_classes}): "
          f"rebuild it and check dataset.data_dir"
      )
  source_desc = f"tfds:{tfds_dataset} in {source.dataset_info.data_dir}"
  info = DatasetInfo(name, num_classes, splits["train"].x.shape[1:], source_desc)
  return splits["train"], splits["test"], info


def tfds_prepare_command(tfds_dataset: str, data_dir: str = "DIR") -> str:
  """The one command that prepares a TFDS dataset for :func:`load_dataset` (needs internet
  and TensorFlow: ``pip install tensorflow tensorflow-datasets``)."""
  return f"tfds build {tfds_dataset} --file_format=array_record --data_dir={data_dir}"


@contextlib.contextmanager
def _quiet_tfds():
  """Holds back TFDS's warnings about a dataset folder it cannot use: the error says it."""
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def _tfds_not_found(tfds_dataset: str, data_dir: str | None, split: str) -> DataNotFoundError:
  """The one-line error for a TFDS dataset that ``tfds.data_source`` cannot open."""
  import tensorflow_datasets as tfds

  with _quiet_tfds():
    builder = tfds.builder(tfds_dataset, data_dir=data_dir)
    prepared = builder.is_prepared()
  where = builder.data_dir
  build = (
      f"'{tfds_prepare_command(tfds_dataset)}' (TensorFlow installed) on a machine with "
      f"internet and copy DIR here, then set dataset.data_dir=DIR"
  )
  if prepared and split not in builder.info.splits:
    return DataNotFoundError(
        f"tfds {tfds_dataset} in {where} has no {split!r} split (it has "
        f"{sorted(builder.info.splits)}): load_dataset needs 'train' and 'test'")
  if prepared:
    file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
    return DataNotFoundError(
        f"tfds {tfds_dataset} in {where} is in {file_format} format but "
        f"tfds.data_source (no TensorFlow) needs array_record: prepare it with {build}"
    )
  given = f"dataset.data_dir={data_dir}" if data_dir else "dataset.data_dir unset"
  return DataNotFoundError(
      f"tfds {tfds_dataset} not found in {where} ({given}) and this machine "
      f"cannot download it: prepare it with {build}"
  )


def _read_source(source) -> ArraySplit:
  """Reads every ``{"image", "label"}`` record of a TFDS data source into an ArraySplit."""
  n = len(source)
  if n == 0:
    raise DataNotFoundError(f"{source!r} is empty: rebuild it and check dataset.data_dir")
  x = None
  y = np.empty(n, np.int32)
  for start in range(0, n, _READ_CHUNK):
    stop = min(n, start + _READ_CHUNK)
    # One batched (parallel) read per chunk; much faster than source[i] per record.
    records = source.__getitems__(list(range(start, stop)))
    for i, record in enumerate(records, start):
      image = np.asarray(record["image"])
      if x is None:
        x = np.empty((n, *image.shape), image.dtype)
      x[i] = image
      y[i] = record["label"]
  if x.dtype != np.uint8:
    raise ConfigError(f"{source!r} has {x.dtype} images; only uint8 images are supported")
  return ArraySplit(x.astype(np.float32) / np.float32(255.0), y)
