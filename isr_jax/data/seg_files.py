"""What the on-disk segmentation loaders share: the ignore label, the checks that a
dataset's files are there, and reading image/label PNG pairs into an ``ArraySplit``.

Each loader passes a ``decode`` function (raw label PNG -> class ids). With
``image_size`` images are resized bilinearly and labels by nearest neighbour;
files are read by a pool of threads.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np

from isr_jax.data.types import ArraySplit, DatasetInfo
from isr_jax.errors import ConfigError, DataNotFoundError

IGNORE_INDEX = 255
"""Label of pixels that losses and metrics skip (void, unlabelled, ego vehicle)."""

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


@dataclasses.dataclass(frozen=True)
class Example:
  """One image file, its label file and its group name."""

  image: str
  label: str
  group: str


def _not_found(name: str, detail: str) -> DataNotFoundError:
  return DataNotFoundError(
      f"{name} {detail}: expected {_LAYOUTS[name]} under dataset.data_dir; this machine has no "
      f"internet, so download it elsewhere, copy it here and set dataset.data_dir"
  )


def require_dir(name: str, data_dir: str | None) -> str:
  if not data_dir:
    raise _not_found(name, "needs dataset.data_dir (it is not set)")
  if not os.path.isdir(data_dir):
    raise _not_found(name, f"not found: {data_dir} is not a directory")
  return data_dir


def require_examples(name: str, root: str, examples: list[Example], where: str) -> list:
  if not examples:
    raise _not_found(name, f"not found in {root} (no images in {where})")
  for example in examples:
    if not os.path.isfile(example.label):
      raise _not_found(name, f"in {root} is incomplete (no label {example.label})")
  return examples


def single_channel(array: np.ndarray) -> np.ndarray:
  return array if array.ndim == 2 else array[..., 0]


def red_channel(array: np.ndarray) -> np.ndarray:
  return array[..., 0] if array.ndim == 3 else array


def _read_pair(example: Example, decode, image_size) -> tuple[np.ndarray, np.ndarray]:
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


def read_split(examples, group_names, decode, image_size, name) -> ArraySplit:
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


def segmentation_info(name, classes, train: ArraySplit, source: str) -> DatasetInfo:
  return DatasetInfo(
      name=name,
      num_classes=len(classes),
      input_shape=tuple(int(v) for v in train.x.shape[1:]),
      source=source,
      task="segmentation",
      ignore_index=IGNORE_INDEX,
      class_names=tuple(classes),
  )
