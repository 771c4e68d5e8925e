"""The geometry of a synthetic street scene: the camera, the canvas and the drawing of every layer.

A pinhole camera at :data:`CAM_H` above a flat ground plane. Each ``draw_*``
function paints one layer (ground, road and facades; trees; poles and signs;
pedestrians; cars; the ego vehicle's hood) into the :class:`Canvas`'s paint map
for a whole chunk of images at once; a later layer occludes an earlier one.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from isr_jax.data.street_paints import (
  MAX_CARS,
  MAX_PEDS,
  MAX_POLES,
  MAX_SEGMENTS,
  MAX_TREES,
  P_BUILDING,
  P_CAR_BODY,
  P_CAR_LIGHT,
  P_CAR_WHEEL,
  P_CAR_WINDOW,
  P_CROWN,
  P_HOOD,
  P_LANE,
  P_PED_BODY,
  P_PED_HEAD,
  P_PED_LEGS,
  P_POLE,
  P_ROAD,
  P_SIDEWALK,
  P_SIGN,
  P_SKY,
  P_TERRAIN,
  P_TRUNK,
)

CAM_H = 3.5  # Virtual camera height in metres (sets how wide the view of the street is).
FOCAL = 1.5  # Focal length in image heights.


class Canvas:
  """Pixel-centre coordinates and the paint map of a chunk of images."""

  def __init__(self, n: int, height: int, width: int):
    self.height, self.width = height, width
    self.yc = np.arange(height, dtype=np.float32) + 0.5  # [H]
    self.xc = np.arange(width, dtype=np.float32) + 0.5  # [W]
    self.paint = np.full((n, height, width), P_SKY, np.uint8)

  def fill(self, mask: np.ndarray, paint) -> None:
    """Paints ``mask`` ``[n, H, W]`` with a paint id (scalar or ``[n]``)."""
    value = np.asarray(paint, np.uint8)
    if value.ndim:
      value = value[:, None, None]
    np.copyto(self.paint, value, where=mask)

  def box(self, top, bottom, left, right, active, paint) -> None:
    """Paints axis-aligned boxes (one per image, float pixel bounds), at least one pixel wide."""
    centre_y, half_y = (top + bottom) / 2, np.maximum((bottom - top) / 2, 0.5)
    centre_x, half_x = (left + right) / 2, np.maximum((right - left) / 2, 0.5)
    rows = np.abs(self.yc[None, :] - centre_y[:, None]) <= half_y[:, None]
    cols = np.abs(self.xc[None, :] - centre_x[:, None]) <= half_x[:, None]
    rows &= active[:, None]
    self.fill(rows[:, :, None] & cols[:, None, :], paint)

  def ellipse(self, cy, cx, ry, rx, active, paint) -> None:
    """Paints filled ellipses (one per image), radii at least 0.7 pixel."""
    dy = np.square((self.yc[None, :] - cy[:, None]) / np.maximum(ry, 0.7)[:, None])
    dx = np.square((self.xc[None, :] - cx[:, None]) / np.maximum(rx, 0.7)[:, None])
    dy[~active] = np.inf
    self.fill(dy[:, :, None] + dx[:, None, :] <= 1.0, paint)


@dataclasses.dataclass
class Scene:
  """Per-image geometry of a chunk (all arrays ``[n]``)."""

  horizon: np.ndarray  # Horizon row (pixels).
  vanish_x: np.ndarray  # Vanishing point column (pixels).
  road_centre: np.ndarray  # Lateral position of the road centre relative to the camera (m).
  road_half: np.ndarray
  sidewalk: np.ndarray
  focal: float  # Pixels.
  near: np.ndarray  # Distance of the bottom image row (m).

  def project(self, distance, lateral):
    """Image position ``(ground_row, column, pixels_per_metre)`` of a ground point."""
    ppm = self.focal / distance
    return self.horizon + CAM_H * ppm, self.vanish_x + lateral * ppm, ppm


def draw_ground_and_buildings(canvas, scene, style, rng) -> np.ndarray:
  """Terrain, road, lane marks, sidewalks and facades; returns the window mask ``[n, H, W]``."""
  n = len(scene.horizon)
  depth = canvas.yc[None, :] - scene.horizon[:, None]  # [n, H] rows below the horizon.
  ground = depth > 0
  safe_depth = np.where(ground, depth, 1.0)
  # Lateral ground coordinate (m) of every pixel, relative to the road centre.
  lateral = (canvas.xc[None, None, :] - scene.vanish_x[:, None, None]) * (
      CAM_H / safe_depth[:, :, None]
  ) - scene.road_centre[:, None, None]
  ground3 = ground[:, :, None]
  lateral = np.abs(lateral)
  street = lateral < (scene.road_half + scene.sidewalk)[:, None, None]
  canvas.fill(ground3 & street, P_SIDEWALK)
  canvas.fill(ground3 & ~street, P_TERRAIN)
  road = ground3 & (lateral < scene.road_half[:, None, None])
  canvas.fill(road, P_ROAD)
  distance = scene.focal * CAM_H / safe_depth  # [n, H]
  dash_phase = rng.random(n)
  dashes = ((distance / 6.0 + dash_phase[:, None]) % 1.0) < 0.45
  canvas.fill(road & (lateral < 0.08) & dashes[:, :, None], P_LANE)

  windows = np.zeros(canvas.paint.shape, bool)
  for side, sign in enumerate((-1.0, 1.0)):
    facade = scene.road_centre + sign * (scene.road_half + scene.sidewalk)  # Lateral (m).
    offset = canvas.xc[None, :] - scene.vanish_x[:, None]  # [n, W]
    on_side = (offset * sign) > 0.5
    # Rows below the horizon of the facade's ground line in every column (0: no facade).
    ground_rows = np.where(on_side, offset * CAM_H / facade[:, None], 0.0)
    ground_rows = np.maximum(ground_rows, 0.0)
    column_distance = np.where(
        ground_rows > 0, scene.focal * CAM_H / np.maximum(ground_rows, 1e-3), np.inf
    )
    lengths = rng.uniform(6.0, 30.0, (n, MAX_SEGMENTS))
    bounds = rng.uniform(0.0, 10.0, (n, 1)) + np.cumsum(lengths, axis=1)  # Segment ends (m).
    segment = (column_distance[:, :, None] >= bounds[:, None, :]).sum(axis=2)  # [n, W]
    present = rng.random((n, MAX_SEGMENTS + 1)) < style("building_density")[:, None]
    present[:, MAX_SEGMENTS] = False  # Beyond the last block: open sky.
    tall = style("building_height")[:, None] * rng.uniform(0.5, 1.6, (n, MAX_SEGMENTS + 1))
    columns = np.arange(n)[:, None]
    has_building = present[columns, segment] & (ground_rows > 0)
    bottom = scene.horizon[:, None] + ground_rows  # [n, W] Ground line of the facade.
    top = bottom - tall[columns, segment] * ground_rows / CAM_H
    rows = canvas.yc[None, :, None]
    mask = (rows >= top[:, None, :]) & (rows < bottom[:, None, :]) & has_building[:, None, :]
    paint = P_BUILDING + side * MAX_SEGMENTS + np.minimum(segment, MAX_SEGMENTS - 1)
    np.copyto(canvas.paint, paint[:, None, :].astype(np.uint8), where=mask)
    # Windows: a grid in facade coordinates (along the street, height above ground).
    along = (np.where(ground_rows > 0, column_distance, 0.0) % 3.2) / 3.2
    win_cols = (along > 0.3) & (along < 0.75)
    above = (bottom[:, None, :] - rows) * CAM_H / np.maximum(ground_rows, 1e-3)[:, None, :]
    win_rows = ((above % 3.0) > 0.9) & ((above % 3.0) < 2.2) & (above > 1.5)
    windows |= mask & win_rows & win_cols[:, None, :]
  return windows


def _object_distances(scene, count, max_count, rng, low=0.1, high=1.15) -> tuple:
  """Distances (far to near) and an active mask ``[n, max_count]`` of up to ``max_count`` objects.

  Objects are spread uniformly in image rows: ``near / distance ~ U(low, high)``.
  """
  n = len(scene.horizon)
  nearness = np.sort(rng.uniform(low, high, (n, max_count)), axis=1)  # Far first.
  distance = scene.near[:, None] / nearness
  chosen = np.argsort(rng.random((n, max_count)), axis=1) < count[:, None]
  return distance.astype(np.float32), chosen


def _counts(rate, maximum, rng) -> np.ndarray:
  return np.minimum(rng.poisson(rate), maximum)


def draw_trees(canvas, scene, style, rng) -> None:
  n = len(scene.horizon)
  distance, active = _object_distances(
      scene, _counts(style("tree_rate"), MAX_TREES, rng), MAX_TREES, rng
  )
  for k in range(MAX_TREES):
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    lateral = scene.road_centre + sign * (scene.road_half + scene.sidewalk * 0.8)
    base, centre_x, ppm = scene.project(distance[:, k], lateral)
    trunk = rng.uniform(1.5, 3.0, n)
    radius = rng.uniform(1.2, 2.6, n)
    canvas.box(base - trunk * ppm, base, centre_x - 0.17 * ppm, centre_x + 0.17 * ppm,
               active[:, k], P_TRUNK + k)
    canvas.ellipse(base - (trunk + radius * 0.8) * ppm, centre_x, radius * ppm,
                   radius * 1.1 * ppm, active[:, k], P_CROWN + k)


def draw_poles(canvas, scene, style, rng) -> None:
  n = len(scene.horizon)
  distance, active = _object_distances(
      scene, _counts(style("pole_rate"), MAX_POLES, rng), MAX_POLES, rng
  )
  for k in range(MAX_POLES):
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    lateral = scene.road_centre + sign * (scene.road_half + 0.4)
    base, centre_x, ppm = scene.project(distance[:, k], lateral)
    tall = rng.uniform(3.5, 6.0, n)
    canvas.box(base - tall * ppm, base, centre_x - 0.08 * ppm, centre_x + 0.08 * ppm,
               active[:, k], P_POLE + k)
    with_sign = active[:, k] & (rng.random(n) < 0.75)
    size = rng.uniform(0.6, 0.9, n)
    sign_x = centre_x - sign * 0.3 * ppm  # Hangs towards the road.
    canvas.box(base - (tall - 0.2) * ppm, base - (tall - 0.2 - size) * ppm,
               sign_x - size / 2 * ppm, sign_x + size / 2 * ppm, with_sign, P_SIGN + k)


def draw_pedestrians(canvas, scene, style, rng) -> None:
  n = len(scene.horizon)
  distance, active = _object_distances(
      scene, _counts(style("pedestrian_rate"), MAX_PEDS, rng), MAX_PEDS, rng
  )
  for k in range(MAX_PEDS):
    sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
    lateral = scene.road_centre + sign * (scene.road_half + scene.sidewalk * rng.uniform(
        0.2, 0.8, n))
    base, centre_x, ppm = scene.project(distance[:, k], lateral)
    tall = rng.uniform(1.5, 1.95, n)
    half = rng.uniform(0.2, 0.3, n) * ppm
    head = 0.25 * ppm
    hip = base - 0.85 * tall * ppm / 1.7
    canvas.box(hip, base, centre_x - half * 0.8, centre_x + half * 0.8, active[:, k],
               P_PED_LEGS + k)
    canvas.box(base - tall * ppm + 2 * head, hip, centre_x - half, centre_x + half,
               active[:, k], P_PED_BODY + k)
    canvas.ellipse(base - tall * ppm + head, centre_x, head, head * 0.8, active[:, k],
                   P_PED_HEAD + k)


def draw_cars(canvas, scene, style, rng) -> None:
  n = len(scene.horizon)
  distance, active = _object_distances(
      scene, _counts(style("car_rate"), MAX_CARS, rng), MAX_CARS, rng, low=0.08
  )
  for k in range(MAX_CARS):
    room = np.maximum(scene.road_half - 1.1, 0.0)
    lateral = scene.road_centre + rng.uniform(-1.0, 1.0, n) * room
    base, centre_x, ppm = scene.project(distance[:, k], lateral)
    half = rng.uniform(0.8, 1.0, n) * ppm
    body_top = base - rng.uniform(0.45, 0.6, n) * ppm
    body_bottom = base - 0.25 * ppm
    roof = base - rng.uniform(1.35, 1.6, n) * ppm
    on = active[:, k]
    wheel = 0.22 * ppm
    for wheel_x in (centre_x - half + wheel * 1.5, centre_x + half - wheel * 1.5):
      canvas.box(base - 2 * wheel, base, wheel_x - wheel, wheel_x + wheel, on, P_CAR_WHEEL + k)
    canvas.box(body_top, body_bottom, centre_x - half, centre_x + half, on, P_CAR_BODY + k)
    canvas.box(roof, body_top, centre_x - half * 0.8, centre_x + half * 0.8, on,
               P_CAR_BODY + k)
    canvas.box(roof + 0.1 * ppm, body_top - 0.05 * ppm, centre_x - half * 0.7,
               centre_x + half * 0.7, on, P_CAR_WINDOW + k)
    for light_x in (centre_x - half * 0.85, centre_x + half * 0.85):
      canvas.box(body_top + 0.05 * ppm, body_top + 0.2 * ppm, light_x - 0.1 * ppm,
                 light_x + 0.1 * ppm, on, P_CAR_LIGHT + k)


def draw_hood(canvas, style) -> None:
  hood = style("hood") * canvas.height  # [n] pixels at the centre.
  across = np.square((canvas.xc - canvas.width / 2) / (canvas.width / 2))  # [W]
  edge = canvas.height - hood[:, None] * (1.0 - 0.6 * across[None, :])  # [n, W]
  mask = (canvas.yc[None, :, None] > edge[:, None, :]) & (hood > 0)[:, None, None]
  canvas.fill(mask, P_HOOD)
