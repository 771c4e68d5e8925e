"""Semantic-segmentation datasets for the OmniISR Table III track, loaded into memory.

Four sources (:data:`isr_jax.data.types.SEGMENTATION_DATASETS`):

* ``"synthetic_streets"``: synthetic, procedurally generated street scenes
  (:mod:`isr_jax.data.street_scenes`); needs no files and is the default here.
* ``"cityscapes"``, ``"camvid"``, ``"synthia_sf"``: the real datasets of the
  paper (§4.1), read from their standard on-disk layouts under ``data_dir``
  (documented on each loader: :mod:`isr_jax.data.cityscapes`,
  :mod:`isr_jax.data.camvid`, :mod:`isr_jax.data.synthia_sf`). This machine
  has no internet: download them elsewhere and copy them here.

Every loader returns images ``x`` float32 ``[N, H, W, 3]`` in ``[0, 1]``, labels
``y`` int32 ``[N, H, W]`` in ``[0, num_classes)`` or
:data:`~isr_jax.data.seg_files.IGNORE_INDEX`, and ``groups`` int32 ``[N]``
(city or sequence) for natural federated partitions.
With ``image_size=(H, W)`` images are resized bilinearly and labels by nearest
neighbour; without it every image of a dataset must have the same size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from isr_jax.data import street_paints, street_scenes
from isr_jax.data.camvid import load_camvid
from isr_jax.data.cityscapes import load_cityscapes
from isr_jax.data.seg_files import segmentation_info
from isr_jax.data.synthia_sf import load_synthia_sf
from isr_jax.data.types import SEGMENTATION_DATASETS, ArraySplit, DatasetInfo
from isr_jax.errors import ConfigError

_OPTIONS = {
    "synthetic_streets": ("num_train", "num_test", "num_cities"),
    "cityscapes": (),
    "camvid": ("num_train",),
    "synthia_sf": ("test_sequences", "void_as_class"),
}


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
  info = segmentation_info("synthetic_streets", street_paints.STREET_CLASSES, splits[0],
                           "synthetic (procedural)")
  return splits[0], splits[1], info
