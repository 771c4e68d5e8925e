"""The types every dataset loader returns, in a module of their own so that the
classification (:mod:`isr_jax.data.datasets`) and segmentation
(:mod:`isr_jax.data.segmentation`) loaders import them without importing each
other."""

from __future__ import annotations

import dataclasses

import numpy as np

SEGMENTATION_DATASETS: tuple[str, ...] = ("synthetic_streets", "cityscapes", "camvid", "synthia_sf")
"""Segmentation names accepted by :func:`isr_jax.data.load_dataset`
(loaded by :mod:`isr_jax.data.segmentation`)."""


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """One split of a dataset held in memory.

  Attributes:
    x: images ``[N, H, W, C]`` float32, in ``[0, 1]`` unless standardized.
    y: int32 class labels ``[N]``, or ``[N, H, W]`` per-pixel labels for
      segmentation (``DatasetInfo.ignore_index`` marks unlabelled pixels).
    groups: optional int group of every example ``[N]`` (city or sequence id),
      used by the ``"natural"`` federated partition; ``None`` if the dataset
      has no such structure.
  """

  x: np.ndarray
  y: np.ndarray
  groups: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model and a report need to know about a loaded dataset.

  Attributes:
    name: the name given to :func:`load_dataset`.
    num_classes: number of classes (labels lie in ``[0, num_classes)``).
    input_shape: ``(H, W, C)`` of one image.
    source: where the data came from (a path, a TFDS name and directory,
      ``"scikit-learn"``, or ``"synthetic (procedural)"``).
    task: ``"classification"`` or ``"segmentation"``.
    ignore_index: the label of pixels to ignore (segmentation: 255), else None.
    class_names: names of the classes in label order (empty if unknown).
  """

  name: str
  num_classes: int
  input_shape: tuple[int, int, int]
  source: str
  task: str = "classification"
  ignore_index: int | None = None
  class_names: tuple[str, ...] = ()
