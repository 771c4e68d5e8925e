"""Cityscapes (fine annotations) for semantic segmentation: the 19 train classes and the loader."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence

import numpy as np

from isr_jax.data.seg_files import (
  IGNORE_INDEX,
  Example,
  read_split,
  require_dir,
  require_examples,
  segmentation_info,
  single_channel,
)
from isr_jax.data.types import ArraySplit, DatasetInfo

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
  root = require_dir("cityscapes", data_dir)
  splits = {}
  for split in ("train", "val"):
    pattern = os.path.join(root, "leftImg8bit", split, "*", "*_leftImg8bit.png")
    examples = []
    for image in sorted(glob.glob(pattern)):
      city = os.path.basename(os.path.dirname(image))
      stem = os.path.basename(image)[: -len("_leftImg8bit.png")]
      label = os.path.join(root, "gtFine", split, city, f"{stem}_gtFine_labelIds.png")
      examples.append(Example(image, label, city))
    splits[split] = require_examples("cityscapes", root, examples, f"leftImg8bit/{split}")
  lut = np.full(256, IGNORE_INDEX, np.uint8)
  for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    lut[label_id] = train_id
  names = sorted({e.group for examples in splits.values() for e in examples})
  train, test = (
      read_split(splits[s], names, lambda a: lut[single_channel(a)], image_size, "cityscapes")
      for s in ("train", "val")
  )
  return train, test, segmentation_info("cityscapes", CITYSCAPES_CLASSES, train,
                                        f"cityscapes in {root}")


def cityscapes_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """Maps Cityscapes ``labelIds`` (any int array) to train ids, :data:`IGNORE_INDEX` elsewhere."""
  label_ids = np.asarray(label_ids)
  out = np.full(label_ids.shape, IGNORE_INDEX, np.int32)
  for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN_ID.items():
    out[label_ids == label_id] = train_id
  return out
