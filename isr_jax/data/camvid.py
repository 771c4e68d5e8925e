"""CamVid (SegNet release, 11 classes) for semantic segmentation: the classes and the loader."""

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
from isr_jax.errors import ConfigError

CAMVID_CLASSES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)
"""The 11 CamVid classes of the SegNet release, in label order (label 11 is void)."""

CAMVID_TOTAL, CAMVID_TRAIN = 701, 600
"""The paper pools CamVid's 701 images and draws 600 for training, 101 for testing."""


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
  root = require_dir("camvid", data_dir)
  examples = []
  for split in ("train", "val", "test"):
    for image in sorted(glob.glob(os.path.join(root, split, "*.png"))):
      file = os.path.basename(image)
      examples.append(Example(image, os.path.join(root, f"{split}annot", file),
                              file.split("_", 1)[0]))
  examples = require_examples("camvid", root, examples, "train/")
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
  decode = lambda a: lut[single_channel(a)]
  train = read_split([examples[i] for i in np.sort(order[:num_train])], names, decode,
                     image_size, "camvid")
  test = read_split([examples[i] for i in np.sort(order[num_train:])], names, decode,
                    image_size, "camvid")
  return train, test, segmentation_info("camvid", CAMVID_CLASSES, train, f"camvid in {root}")
