"""Semantic-segmentation datasets for the OmniISR Table III track, loaded into memory.

Four sources (:data:`isr_jax.data.types.SEGMENTATION_DATASETS`):

* ``"synthetic_streets"``: synthetic, procedurally generated street scenes
  (:mod:`isr_jax.data.street_scenes`); needs no files and is the default here.
* ``"cityscapes"``, ``"camvid"``, ``"synthia_sf"``: the real datasets of the
  paper (§4.1), read from their standard on-disk layouts under ``data_dir``
  (documented on each loader). This machine has no internet: download them
  elsewhere and copy them here.

Every loader returns images ``x`` float32 ``[N, H, W, 3]`` in ``[0, 1]``, labels
``y`` int32 ``[N, H, W]`` in ``[0, num_classes)`` or :data:`IGNORE_INDEX`, and
``groups`` int32 ``[N]`` (city or sequence) for natural federated partitions.
With ``image_size=(H, W)`` images are resized bilinearly and labels by nearest
neighbour; without it every image of a dataset must have the same size.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import re
from collections.abc import Callable, Sequence

import numpy as np

from isr_jax.data import street_scenes
from isr_jax.data.types import SEGMENTATION_DATASETS, ArraySplit, DatasetInfo
from isr_jax.errors import ConfigError, DataNotFoundError

IGNORE_INDEX = 255
"""Label of pixels that losses and metrics skip (void, unlabelled, ego vehicle)."""

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
"""The 19 Cityscapes train classes, in train-id order."""

CITYSCAPES_LABEL_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
"""Cityscapes ``labelIds`` -> train ids (the official table); every other id is ignored."""

CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)
"""The 11 CamVid classes of the SegNet release, in label order (label 11 is void)."""

CAMVID_TOTAL, CAMVID_TRAIN = 701, 600
"""The paper pools CamVid's 701 images and draws 600 for training, 101 for testing."""

SYNTHIA_SF_CLASSES: tuple[str, ...] = (
    "void", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
    "train", "motorcycle", "bicycle", "road_lines", "other", "road_works",
)
"""The 23 SYNTHIA-SF label ids 0..22 (id 0 is void), as listed in its README."""

SYNTHIA_SF_TOTAL, SYNTHIA_SF_TEST = 2224, 628
"""SYNTHIA-SF has 2,224 frames; the paper trains on 1,596 and tests on 628."""

_READ_WORKERS = 8  # Threads decoding PNGs (PIL releases the GIL while decoding).

_LAYOUTS = {
    "cityscapes": (
        "leftImg8bit/{train,val}/<city>/<city>_xxxxxx_xxxxxx_leftImg8bit.png and "
        "gtFine/{train,val}/<city>/<city>_xxxxxx_xxxxxx_gtFine_labelIds.png"
    ),
    "camvid": (
        "the SegNet layout {train,val,test}/<seq>_<frame>.png with label PNGs of the same name "
        "in {train,val,test}annot/ (class ids 0..10, 11 = void)"
    ),
    "synthia_sf": (
        "SEQ<n>/RGBLeft/<frame>.png with label PNGs of the same name in SEQ<n>/GTLeft/ "
        "(class id in the red channel)"
    ),
}

_OPTIONS = {
    "synthetic_streets": ("num_train", "num_test", "num_cities"),
    "cityscapes": (),
    "camvid": ("num_train",),
    "synthia_sf": ("test_sequences", "void_as_class"),
}


@dataclasses.dataclass(frozen=True)
class _Example:
  """One image file, its label file and its group name."""

  image: str
  label: str
  group: str


def load_segmentation(
    name: str,
    *,
    data_dir: str | None = None,
    seed: int = 0,
    image_size: Sequence[int] | None = None,
    **options,
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Loads a segmentation dataset's train and test splits into memory.

  Args:
    name: one of :data:`SEGMENTATION_DATASETS`.
    data_dir: the dataset's root directory (ignored by ``"synthetic_streets"``).
    seed: seed of the synthetic scenes and of the CamVid and SYNTHIA-SF splits.
    image_size: ``(H, W)`` to resize to; ``None`` keeps the files' size
      (``"synthetic_streets"``: :data:`street_scenes.DEFAULT_IMAGE_SIZE`).
    **options: per dataset: ``"synthetic_streets"``: ``num_train`` (1200),
      ``num_test`` (300), ``num_cities`` (6); ``"camvid"``: ``num_train``
      (see :func:`load_camvid`); ``"synthia_sf"``: ``test_sequences``,
      ``void_as_class`` (see :func:`load_synthia_sf`).

  Returns:
    ``(train, test, info)`` with ``train.groups`` and ``test.groups`` set and
    ``info.task == "segmentation"``.

  Raises:
    ConfigError: unknown name or option, or a bad option or image size.
    DataNotFoundError: a real dataset is missing or incomplete in ``data_dir``.
  """
  if name not in SEGMENTATION_DATASETS:
    raise ConfigError(f"dataset.name={name!r} is not one of {list(SEGMENTATION_DATASETS)}")
  unknown = sorted(set(options) - set(_OPTIONS[name]))
  if unknown:
    raise ConfigError(
        f"dataset.{unknown[0]} is not an option of dataset.name={name!r}; its options are "
        f"{list(_OPTIONS[name])}"
    )
  size = None if image_size is None else check_image_size(image_size)
  if name == "synthetic_streets":
    return load_synthetic_streets(seed=seed, image_size=size or street_scenes.DEFAULT_IMAGE_SIZE,
                                  **options)
  loaders: dict[str, Callable] = {
      "cityscapes": load_cityscapes, "camvid": load_camvid, "synthia_sf": load_synthia_sf,
  }
  return loaders[name](data_dir, seed=seed, image_size=size, **options)


def check_image_size(image_size) -> tuple[int, int]:
  """Validates ``(H, W)``.

  Raises:
    ConfigError: not two integers >= 1.
  """
  try:
    height, width = image_size
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
             for v in (height, width))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(f"dataset.image_size={image_size!r} must be (H, W), two integers >= 1")
  return int(height), int(width)


# ----------------------------------------------------------------------------- synthetic


def load_synthetic_streets(
    *,
    seed: int = 0,
    image_size: Sequence[int] = street_scenes.DEFAULT_IMAGE_SIZE,
    num_train: int = 1200,
    num_test: int = 300,
    num_cities: int = street_scenes.DEFAULT_NUM_CITIES,
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Synthetic procedural street scenes (no download): train and test from the same cities.

  The train and test images are independent draws (streams 0 and 1) of
  :func:`street_scenes.generate_street_scenes` with shared city styles; the
  groups are city ids.

  Args:
    seed: seed of the cities and images.
    image_size: ``(H, W)``, each >= 16.
    num_train: train images, >= 1.
    num_test: test images, >= 1.
    num_cities: number of cities, >= 1.

  Returns:
    ``(train, test, info)``.
  """
  for setting, value in (("num_train", num_train), ("num_test", num_test)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ConfigError(f"dataset.{setting}={value!r} must be an integer >= 1")
  splits = []
  for stream, count in enumerate((num_train, num_test)):
    x, y, groups = street_scenes.generate_street_scenes(
        count, seed=seed, image_size=image_size, num_cities=num_cities, stream=stream
    )
    splits.append(ArraySplit(x, y, groups))
  info = _info("synthetic_streets", street_scenes.STREET_CLASSES, splits[0],
               "synthetic (procedural)")
  return splits[0], splits[1], info


# ----------------------------------------------------------------------------- cityscapes


def load_cityscapes(
    data_dir: str | None, *, seed: int = 0, image_size: Sequence[int] | None = None
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """Cityscapes (fine annotations): train split for training, val split for testing.

  Layout under ``data_dir``::

    leftImg8bit/{train,val}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

  ``labelIds`` are mapped to the 19 train ids with
  :data:`CITYSCAPES_LABEL_TO_TRAIN_ID`; all other ids become :data:`IGNORE_INDEX`.
  Groups are cities, numbered in sorted order over both splits (the val cities
  do not occur in train). At the native 1024x2048 the train split needs ~75 GB
  as float32: set ``image_size``.

  Args:
    data_dir: the Cityscapes root.
    seed: unused (the official split is fixed).
    image_size: ``(H, W)`` to resize to.

  Returns:
    ``(train, test, info)``.
  """
  del seed
  root = _require_dir("cityscapes", data_dir)
  splits = {}
  for split in ("train", "val"):
    pattern = os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")
    examples = []
    for image in sorted(glob.glob(pattern)):
      city = os.path.basename(os.path.dirname(image))
      stem = os.path.basename(image)[: -len("_leftImg8bit.png")]
      label = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
      examples.append(_Example(image, label, city))
    splits[split] = _require_examples("cityscapes", root, examples, f"leftImg8bit/{split}")
  lut = np.full(256, IGNORE_INDEX, np.uint8)
  for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    lut[label_id] = train_id
  names = sorted({e.group for examples in splits.values() for e in examples})
  train, test = (
      _read_split(splits[s], names, lambda a: lut[_single_channel(a)], image_size, "cityscapes")
      for s in ("train", "val")
  )
  return train, test, _info("cityscapes", CITYSCAPES_CLASSES, train, f"cityscapes in {root}")


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps Cityscapes ``labelIds`` (any int array) to train ids, :data:`IGNORE_INDEX` elsewhere."""
  label_ids = np.asarray(label_ids)
  out = np.full(label_ids.shape, IGNORE_INDEX, np.int32)
  for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    out[label_ids == label_id] = train_id
  return out


# ----------------------------------------------------------------------------- camvid


def load_camvid(
    data_dir: str | None,
    *,
    seed: int = 0,
    image_size: Sequence[int] | None = None,
    num_train: int | None = None,
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """CamVid (SegNet release, 11 classes) with the paper's random 600/101 split.

  Layout under ``data_dir``::

    {train,val,test}/<seq>_<frame>.png            e.g. 0001TP_006690.png, Seq05VD_f00000.png
    {train,val,test}annot/<seq>_<frame>.png       class ids 0..10, 11 = void

  The images of all three folders are pooled (sorted by path), permuted with
  ``seed`` and the first ``num_train`` go to training, the rest to testing, as
  the paper "randomly selected 600 samples for training and used the remaining
  101 samples as a test dataset". Void (11) and any id above it become
  :data:`IGNORE_INDEX`. Groups are sequences (the file-name prefix before the
  first ``_``: 0001TP, 0006R0, 0016E5, Seq05VD), numbered in sorted order.

  Args:
    data_dir: the CamVid root.
    seed: seed of the split.
    image_size: ``(H, W)`` to resize to (the files are 360x480).
    num_train: training images; default ``round(600 / 701 * N)``, which is 600
      for the full 701 images.

  Returns:
    ``(train, test, info)``.
  """
  root = _require_dir("camvid", data_dir)
  examples = []
  for split in ("train", "val", "test"):
    for image in sorted(glob.glob(os.path.join(root, split, "*.png"))):
      file = os.path.basename(image)
      examples.append(_Example(image, os.path.join(root, f"{split}annot", file),
                               file.split("_", 1)[0]))
  examples = _require_examples("camvid", root, examples, "train/")
  total = len(examples)
  if num_train is None:
    num_train = round(CAMVID_TRAIN / CAMVID_TOTAL * total)
  if (not isinstance(num_train, (int, np.integer)) or isinstance(num_train, bool)
      or not 1 <= num_train < total):
    raise ConfigError(
        f"dataset.num_train={num_train!r} must be an integer in [1, {total - 1}] for the "
        f"{total} CamVid images in {root}"
    )
  order = np.random.default_rng(seed).permutation(total)
  names = sorted({e.group for e in examples})
  lut = np.full(256, IGNORE_INDEX, np.uint8)
  lut[: len(CAMVID_CLASSES)] = np.arange(len(CAMVID_CLASSES))
  decode = lambda a: lut[_single_channel(a)]
  train = _read_split([examples[i] for i in np.sort(order[:num_train])], names, decode,
                      image_size, "camvid")
  test = _read_split([examples[i] for i in np.sort(order[num_train:])], names, decode,
                     image_size, "camvid")
  return train, test, _info("camvid", CAMVID_CLASSES, train, f"camvid in {root}")


# ----------------------------------------------------------------------------- synthia-sf


def load_synthia_sf(
    data_dir: str | None,
    *,
    seed: int = 0,
    image_size: Sequence[int] | None = None,
    test_sequences: Sequence[int | str] | None = None,
    void_as_class: bool = False,
) -> tuple[ArraySplit, ArraySplit, DatasetInfo]:
  """SYNTHIA-SF (San Francisco, 6 sequences, 2,224 frames, ids 0..22) with the paper's split size.

  Layout under ``data_dir``::

    SEQ<n>/RGBLeft/<frame>.png     RGB frames (1920x1080)
    SEQ<n>/GTLeft/<frame>.png      labels: the class id is in the RED channel
                                   (green/blue hold instance ids)

  Label ids follow :data:`SYNTHIA_SF_CLASSES`; id 0 is "void". By default void
  becomes :data:`IGNORE_INDEX` and ids 1..22 become 0..21 (22 classes); with
  ``void_as_class=True`` the 23 ids are kept as classes, matching the paper's
  count of "23 semantic classes". Ids above 22 are ignored.

  Split: the paper gives only the sizes (1,596 train, 628 test). By default the
  test split is a seeded random ``628 / 2224`` share of every sequence
  (largest-remainder rounding; exactly 628 frames on the full dataset), so that
  every sequence, i.e. every natural client, occurs in both splits. With
  ``test_sequences`` (e.g. ``("SEQ5",)`` or ``(5,)``) whole sequences are held
  out instead.

  Args:
    data_dir: the SYNTHIA-SF root (holding ``SEQ1`` ... ``SEQ6``).
    seed: seed of the random split.
    image_size: ``(H, W)`` to resize to.
    test_sequences: sequences held out for testing; ``None`` for the random split.
    void_as_class: keep void as class 0 (23 classes) instead of ignoring it.

  Returns:
    ``(train, test, info)``.
  """
  root = _require_dir("synthia_sf", data_dir)
  examples = []
  for seq_dir in sorted(glob.glob(os.path.join(root, "SEQ*")), key=_sequence_number):
    seq = os.path.basename(seq_dir)
    for image in sorted(glob.glob(os.path.join(seq_dir, "RGBLeft", "*.png"))):
      examples.append(_Example(image, os.path.join(seq_dir, "GTLeft", os.path.basename(image)),
                               seq))
  examples = _require_examples("synthia_sf", root, examples, "SEQ*/RGBLeft/")
  names = sorted({e.group for e in examples}, key=_sequence_number)
  group = np.array([names.index(e.group) for e in examples])
  if test_sequences is None:
    is_test = _stratified_test_mask(group, SYNTHIA_SF_TEST / SYNTHIA_SF_TOTAL, seed)
  else:
    held = _sequence_names(test_sequences, names)
    is_test = np.array([e.group in held for e in examples])
  if is_test.all() or not is_test.any():
    raise ConfigError(
        f"synthia_sf: the split of the {len(examples)} frames in {root} leaves the train or test "
        f"split empty; add frames or set dataset.test_sequences"
    )
  lut = np.full(256, IGNORE_INDEX, np.uint8)
  if void_as_class:
    lut[: len(SYNTHIA_SF_CLASSES)] = np.arange(len(SYNTHIA_SF_CLASSES))
    classes = SYNTHIA_SF_CLASSES
  else:
    lut[1 : len(SYNTHIA_SF_CLASSES)] = np.arange(len(SYNTHIA_SF_CLASSES) - 1)
    classes = SYNTHIA_SF_CLASSES[1:]
  decode = lambda a: lut[_red_channel(a)]
  train = _read_split([e for e, t in zip(examples, is_test, strict=True) if not t], names,
                      decode, image_size, "synthia_sf")
  test = _read_split([e for e, t in zip(examples, is_test, strict=True) if t], names, decode,
                     image_size, "synthia_sf")
  return train, test, _info("synthia_sf", classes, train, f"synthia_sf in {root}")


def _sequence_number(path: str) -> tuple[int, str]:
  match = re.search(r"(\d+)$", os.path.basename(path))
  return (int(match.group(1)) if match else -1, os.path.basename(path))


def _sequence_names(test_sequences, names: list[str]) -> set[str]:
  """``("SEQ5", 6)`` -> ``{"SEQ5", "SEQ6"}``, checked against the sequences found."""
  if isinstance(test_sequences, (str, int)):
    test_sequences = (test_sequences,)
  held = {f"SEQ{s}" if isinstance(s, (int, np.integer)) else str(s) for s in test_sequences}
  if not held or not held < set(names):
    raise ConfigError(
        f"dataset.test_sequences={list(test_sequences)!r} must be a non-empty proper subset of "
        f"the sequences found, {names}"
    )
  return held


def _stratified_test_mask(group: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """A seeded random test mask holding ``fraction`` of every group (largest remainder)."""
  rng = np.random.default_rng(seed)
  sizes = np.bincount(group)
  target = fraction * len(group)
  quota = np.floor(fraction * sizes).astype(np.int64)
  remainder = fraction * sizes - quota
  extra = int(round(target)) - quota.sum()
  quota[np.argsort(-remainder, kind="stable")[:extra]] += 1
  quota = np.minimum(quota, sizes - 1)  # Keep at least one train frame per sequence.
  is_test = np.zeros(len(group), bool)
  for g, count in enumerate(quota):
    members = np.flatnonzero(group == g)
    is_test[rng.choice(members, size=count, replace=False)] = True
  return is_test


# ----------------------------------------------------------------------------- reading


def _not_found(name: str, detail: str) -> DataNotFoundError:
  return DataNotFoundError(
      f"{name} {detail}: expected {_LAYOUTS[name]} under dataset.data_dir; this machine has no "
      f"internet, so download it elsewhere, copy it here and set dataset.data_dir"
  )


def _require_dir(name: str, data_dir: str | None) -> str:
  if not data_dir:
    raise _not_found(name, "needs dataset.data_dir (it is not set)")
  if not os.path.isdir(data_dir):
    raise _not_found(name, f"not found: {data_dir} is not a directory")
  return data_dir


def _require_examples(name: str, root: str, examples: list[_Example], where: str) -> list:
  if not examples:
    raise _not_found(name, f"not found in {root} (no images in {where})")
  for example in examples:
    if not os.path.isfile(example.label):
      raise _not_found(name, f"in {root} is incomplete (no label {example.label})")
  return examples


def _single_channel(array: np.ndarray) -> np.ndarray:
  return array if array.ndim == 2 else array[..., 0]


def _red_channel(array: np.ndarray) -> np.ndarray:
  return array[..., 0] if array.ndim == 3 else array


def _read_pair(example: _Example, decode, image_size) -> tuple[np.ndarray, np.ndarray]:
  """Reads one image (RGB uint8) and its decoded label map (uint8), resized if asked."""
  from PIL import Image

  with Image.open(example.image) as image:
    image = image.convert("RGB")
    if image_size is not None:
      image = image.resize((image_size[1], image_size[0]), Image.Resampling.BILINEAR)
    rgb = np.asarray(image, np.uint8)
  with Image.open(example.label) as label:
    raw = np.asarray(label)
  if raw.dtype != np.uint8:  # 16-bit label PNGs: ids are small, anything >= 256 is ignored.
    raw = np.where(raw < 256, raw, IGNORE_INDEX).astype(np.uint8)
  labels = decode(raw).astype(np.uint8)
  if image_size is not None:
    labels = np.asarray(Image.fromarray(labels).resize((image_size[1], image_size[0]),
                                                        Image.Resampling.NEAREST))
  if labels.shape != rgb.shape[:2]:
    raise ConfigError(
        f"{example.label} is {labels.shape[1]}x{labels.shape[0]} but its image {example.image} "
        f"is {rgb.shape[1]}x{rgb.shape[0]}: re-download the dataset"
    )
  return rgb, labels


def _read_split(examples, group_names, decode, image_size, name) -> ArraySplit:
  """Reads examples in parallel into float32 images, int32 labels and int32 groups."""
  n = len(examples)
  workers = max(1, min(_READ_WORKERS, os.cpu_count() or 1, n))
  x = y = None
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pairs = pool.map(lambda e: _read_pair(e, decode, image_size), examples)
    for i, (rgb, labels) in enumerate(pairs):
      if x is None:
        x = np.empty((n, *rgb.shape), np.float32)
        y = np.empty((n, *labels.shape), np.int32)
      if rgb.shape != x.shape[1:]:
        raise ConfigError(
            f"{name}: {examples[i].image} is {rgb.shape[1]}x{rgb.shape[0]} but earlier images "
            f"are {x.shape[2]}x{x.shape[1]}: set dataset.image_size to resize them"
        )
      np.multiply(rgb, np.float32(1 / 255), out=x[i])
      y[i] = labels
  index = {g: k for k, g in enumerate(group_names)}
  groups = np.array([index[e.group] for e in examples], np.int32)
  return ArraySplit(x, y, groups)


def _info(name, classes, train: ArraySplit, source: str) -> DatasetInfo:
  return DatasetInfo(
      name=name,
      num_classes=len(classes),
      input_shape=tuple(int(v) for v in train.x.shape[1:]),
      source=source,
      task="segmentation",
      ignore_index=IGNORE_INDEX,
      class_names=tuple(classes),
  )
