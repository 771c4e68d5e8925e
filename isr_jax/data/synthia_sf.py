"""SYNTHIA-SF for semantic segmentation: its 23 label ids and the loader with the paper's split."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

import numpy as np

from isr_jax.data.seg_files import (
  IGNORE_INDEX,
  Example,
  read_split,
  red_channel,
  require_dir,
  require_examples,
  segmentation_info,
)
from isr_jax.data.types import ArraySplit, DatasetInfo
from isr_jax.errors import ConfigError

SYNTHIA_SF_CLASSES: tuple[str, ...] = (
    "void", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light",
    "traffic_sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
    "train", "motorcycle", "bicycle", "road_lines", "other", "road_works",
)
"""The 23 SYNTHIA-SF label ids 0..22 (id 0 is void), as listed in its README."""

SYNTHIA_SF_TOTAL, SYNTHIA_SF_TEST = 2224, 628
"""SYNTHIA-SF has 2,224 frames; the paper trains on 1,596 and tests on 628."""


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
  root = require_dir("synthia_sf", data_dir)
  examples = []
  for seq_dir in sorted(glob.glob(os.path.join(root, "SEQ*")), key=_sequence_number):
    seq = os.path.basename(seq_dir)
    for image in sorted(glob.glob(os.path.join(seq_dir, "RGBLeft", "*.png"))):
      examples.append(Example(image, os.path.join(seq_dir, "GTLeft", os.path.basename(image)),
                              seq))
  examples = require_examples("synthia_sf", root, examples, "SEQ*/RGBLeft/")
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
  decode = lambda a: lut[red_channel(a)]
  train = read_split([e for e, t in zip(examples, is_test, strict=True) if not t], names,
                     decode, image_size, "synthia_sf")
  test = read_split([e for e, t in zip(examples, is_test, strict=True) if t], names, decode,
                    image_size, "synthia_sf")
  return train, test, segmentation_info("synthia_sf", classes, train, f"synthia_sf in {root}")


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
