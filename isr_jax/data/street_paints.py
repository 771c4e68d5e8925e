"""What the synthetic street renderer paints: the classes, the paint ids and colour prototypes.

Every drawing step of :mod:`isr_jax.data.street_layout` writes paint ids (one
per drawable part: sky, road, each building block, each tree's crown, ...) into
a ``uint8`` paint map; :data:`CLASS_OF_PAINT` turns the map into labels, and
:mod:`isr_jax.data.street_render` turns it into colours.
"""

from __future__ import annotations

import numpy as np

STREET_CLASSES: tuple[str, ...] = (
    "road",
    "sidewalk",
    "building",
    "pole",
    "traffic_sign",
    "vegetation",
    "terrain",
    "sky",
    "pedestrian",
    "car",
)
"""Class names of the synthetic street scenes, in label order (a Cityscapes-like subset)."""

IGNORE_INDEX = 255
"""Label of the ego vehicle's hood (not a class; ignored by losses and metrics)."""

_ROAD, _SIDEWALK, _BUILDING, _POLE, _SIGN, _VEGETATION, _TERRAIN, _SKY, _PEDESTRIAN, _CAR = range(
    10
)

MAX_SEGMENTS = 12  # Building blocks per side of the street.
MAX_TREES = 8
MAX_POLES = 4
MAX_PEDS = 8
MAX_CARS = 8

# Paint ids: each is drawn with its own colour and maps to one class.
P_SKY, P_ROAD, P_LANE, P_SIDEWALK, P_TERRAIN, P_HOOD = range(6)
P_BUILDING = 8  # + side * MAX_SEGMENTS + segment.
P_CROWN = P_BUILDING + 2 * MAX_SEGMENTS  # + tree.
P_TRUNK = P_CROWN + MAX_TREES
P_POLE = P_TRUNK + MAX_TREES
P_SIGN = P_POLE + MAX_POLES
P_PED_BODY = P_SIGN + MAX_POLES
P_PED_LEGS = P_PED_BODY + MAX_PEDS
P_PED_HEAD = P_PED_LEGS + MAX_PEDS
P_CAR_BODY = P_PED_HEAD + MAX_PEDS
P_CAR_WINDOW = P_CAR_BODY + MAX_CARS
P_CAR_WHEEL = P_CAR_WINDOW + MAX_CARS
P_CAR_LIGHT = P_CAR_WHEEL + MAX_CARS
NUM_PAINTS = P_CAR_LIGHT + MAX_CARS


def _paint_classes() -> np.ndarray:
  table = np.full(NUM_PAINTS, IGNORE_INDEX, np.uint8)
  table[P_SKY] = _SKY
  table[[P_ROAD, P_LANE]] = _ROAD
  table[P_SIDEWALK] = _SIDEWALK
  table[P_TERRAIN] = _TERRAIN
  table[P_BUILDING:P_CROWN] = _BUILDING
  table[P_CROWN:P_POLE] = _VEGETATION
  table[P_POLE:P_SIGN] = _POLE
  table[P_SIGN:P_PED_BODY] = _SIGN
  table[P_PED_BODY:P_CAR_BODY] = _PEDESTRIAN
  table[P_CAR_BODY:] = _CAR
  return table


CLASS_OF_PAINT = _paint_classes()

# Colour prototypes (RGB in [0, 1]) that city styles mix or jitter.
SKY_COLOURS = np.array(
    [[0.42, 0.62, 0.90], [0.72, 0.74, 0.78], [0.88, 0.62, 0.45], [0.80, 0.80, 0.68]], np.float32
)
FACADE_COLOURS = np.array(
    [[0.80, 0.72, 0.58], [0.62, 0.30, 0.24], [0.55, 0.55, 0.56], [0.88, 0.86, 0.82],
     [0.45, 0.40, 0.35], [0.70, 0.60, 0.40]], np.float32
)
CAR_COLOURS = np.array(
    [[0.92, 0.92, 0.92], [0.08, 0.08, 0.09], [0.50, 0.50, 0.52], [0.72, 0.73, 0.76],
     [0.70, 0.08, 0.08], [0.10, 0.20, 0.55], [0.15, 0.35, 0.20], [0.85, 0.70, 0.15]], np.float32
)
SIGN_COLOURS = np.array(
    [[0.10, 0.30, 0.80], [0.85, 0.10, 0.10], [0.95, 0.80, 0.10], [0.95, 0.95, 0.95]], np.float32
)
SKIN_COLOURS = np.array(
    [[0.95, 0.80, 0.65], [0.80, 0.60, 0.45], [0.55, 0.38, 0.26], [0.35, 0.24, 0.16]], np.float32
)
