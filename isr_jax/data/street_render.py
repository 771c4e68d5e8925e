"""Rendering a chunk of synthetic street scenes: the layout, then colours and lighting.

:func:`render` lays the chunk out (:mod:`isr_jax.data.street_layout`), looks up
the label and the colour of every paint, then darkens windows and adds the sky
gradient, haze, illumination, noise and blur.
"""

from __future__ import annotations

import numpy as np

from isr_jax.data.street_layout import (
  CAM_H,
  FOCAL,
  Canvas,
  Scene,
  draw_cars,
  draw_ground_and_buildings,
  draw_hood,
  draw_pedestrians,
  draw_poles,
  draw_trees,
)
from isr_jax.data.street_paints import (
  CAR_COLOURS,
  CLASS_OF_PAINT,
  MAX_CARS,
  MAX_PEDS,
  MAX_POLES,
  MAX_SEGMENTS,
  MAX_TREES,
  NUM_PAINTS,
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
  SKIN_COLOURS,
)


def _styles_array(styles, city, field) -> np.ndarray:
  """A style field for every image: ``[n]`` for scalars, ``[n, 3]`` for colours."""
  return np.array([getattr(s, field) for s in styles], np.float32)[city]


def render(city, styles, height, width, rng) -> tuple[np.ndarray, np.ndarray]:
  """Renders one chunk; returns ``(x [n, H, W, 3] float32, y [n, H, W] int32)``."""
  n = len(city)
  style = lambda field: _styles_array(styles, city, field)
  canvas = Canvas(n, height, width)
  horizon = height * np.clip(style("horizon") + rng.normal(0, 0.015, n), 0.25, 0.6)
  road_half = style("road_half_width") * rng.uniform(0.85, 1.15, n)
  focal = FOCAL * height
  scene = Scene(
      horizon=horizon.astype(np.float32),
      vanish_x=(width * (0.5 + rng.normal(0, 0.04, n))).astype(np.float32),
      road_centre=(road_half * rng.uniform(-0.5, 0.5, n)).astype(np.float32),
      road_half=road_half.astype(np.float32),
      sidewalk=(style("sidewalk_width") * rng.uniform(0.8, 1.2, n)).astype(np.float32),
      focal=focal,
      near=(focal * CAM_H / (height - horizon)).astype(np.float32),
  )
  windows = draw_ground_and_buildings(canvas, scene, style, rng)
  draw_trees(canvas, scene, style, rng)
  draw_poles(canvas, scene, style, rng)
  draw_pedestrians(canvas, scene, style, rng)
  draw_cars(canvas, scene, style, rng)
  draw_hood(canvas, style)
  colours = _colour_table(n, style, rng)
  labels = CLASS_OF_PAINT[canvas.paint].astype(np.int32)
  image = colours[np.arange(n)[:, None, None], canvas.paint]  # [n, H, W, 3]
  image[windows] *= 0.55
  return _light(image, canvas, scene, style, rng), labels


def _colour_table(n, style, rng) -> np.ndarray:
  """``[n, paints, 3]`` colour of every paint id in every image."""
  table = np.zeros((n, NUM_PAINTS, 3), np.float32)

  def jitter(base, spread, count=None):
    shape = (n, 3) if count is None else (n, count, 3)
    base = base if count is None else base[:, None, :]
    return np.clip(base + rng.normal(0, spread, shape), 0.0, 1.0)

  colour = style  # Colour fields come back as [n, 3].
  table[:, P_SKY] = jitter(colour("sky"), 0.03)
  table[:, P_ROAD] = jitter(colour("road"), 0.02)
  table[:, P_LANE] = jitter(colour("lane"), 0.02)
  table[:, P_SIDEWALK] = jitter(colour("sidewalk"), 0.03)
  table[:, P_TERRAIN] = jitter(colour("terrain"), 0.04)
  table[:, P_HOOD] = jitter(np.full((n, 3), 0.12, np.float32), 0.03)
  table[:, P_BUILDING:P_CROWN] = jitter(colour("facade"), 0.07, 2 * MAX_SEGMENTS)
  table[:, P_CROWN:P_TRUNK] = jitter(colour("vegetation"), 0.05, MAX_TREES)
  table[:, P_TRUNK:P_POLE] = jitter(np.tile([[0.33, 0.24, 0.15]], (n, 1)), 0.03, MAX_TREES)
  table[:, P_POLE:P_SIGN] = jitter(np.full((n, 3), 0.5, np.float32), 0.05, MAX_POLES)
  table[:, P_SIGN:P_PED_BODY] = jitter(colour("sign"), 0.04, MAX_POLES)
  table[:, P_PED_BODY:P_PED_LEGS] = rng.uniform(0.05, 0.8, (n, MAX_PEDS, 3))
  table[:, P_PED_LEGS:P_PED_HEAD] = rng.uniform(0.05, 0.4, (n, MAX_PEDS, 3))
  table[:, P_PED_HEAD:P_CAR_BODY] = SKIN_COLOURS[rng.integers(len(SKIN_COLOURS),
                                                              size=(n, MAX_PEDS))]
  cars = CAR_COLOURS[rng.integers(len(CAR_COLOURS), size=(n, MAX_CARS))]
  table[:, P_CAR_BODY:P_CAR_WINDOW] = np.clip(cars + rng.normal(0, 0.04, cars.shape), 0, 1)
  table[:, P_CAR_WINDOW:P_CAR_WHEEL] = jitter(np.tile([[0.14, 0.17, 0.22]], (n, 1)), 0.03,
                                              MAX_CARS)
  table[:, P_CAR_WHEEL:P_CAR_LIGHT] = 0.05
  table[:, P_CAR_LIGHT:] = (0.85, 0.08, 0.08)
  return table


def _light(image, canvas, scene, style, rng) -> np.ndarray:
  """Sky gradient, facade shading, haze, illumination, noise and blur; clips to ``[0, 1]``."""
  n, height, width, _ = image.shape
  rows = canvas.yc[None, :] / scene.horizon[:, None]  # [n, H], 1 at the horizon.
  sky = (canvas.paint == P_SKY)[..., None]
  image *= np.where(sky, (0.8 + 0.25 * np.clip(rows, 0, 1))[:, :, None, None], 1.0)
  # Haze: blend towards the sky colour near the horizon.
  closeness = np.clip(1.0 - np.abs(canvas.yc[None, :] - scene.horizon[:, None]) / (0.3 * height),
                      0, 1)
  weight = (style("haze")[:, None] * np.square(closeness))[:, :, None, None]
  image = image * (1 - weight) + weight * style("sky")[:, None, None, :]
  # Illumination: per-image brightness and tint, smooth low-frequency variation.
  gain = style("brightness") * rng.uniform(0.85, 1.15, n)
  image *= (gain[:, None] * style("tint"))[:, None, None, :]
  image *= (1.0 + _smooth_field(canvas, rng, amplitude=0.06))[..., None]
  image += rng.standard_normal(image.shape, np.float32) * style("noise")[:, None, None, None]
  image = _blur(image)
  return np.clip(image, 0.0, 1.0).astype(np.float32)


def _smooth_field(canvas, rng, *, amplitude: float, waves: int = 3) -> np.ndarray:
  """A smooth random field ``[n, H, W]``: a sum of a few low-frequency plane waves."""
  n = canvas.paint.shape[0]
  field = np.zeros(canvas.paint.shape, np.float32)
  u = canvas.yc / canvas.height
  v = canvas.xc / canvas.width
  for _ in range(waves):
    fy, fx = rng.uniform(-2.0, 2.0, (2, n, 1)).astype(np.float32) * np.float32(np.pi)
    phase = rng.uniform(0, 2 * np.pi, (n, 1)).astype(np.float32)
    field += amplitude * np.cos((fy * u)[:, :, None] + (fx * v + phase)[:, None, :])
  return field


def _blur(image: np.ndarray) -> np.ndarray:
  """Separable ``[1, 2, 1] / 4`` blur over H and W with replicated edges."""
  out = image.copy()
  out[:, 1:-1] = 0.5 * image[:, 1:-1] + 0.25 * (image[:, :-2] + image[:, 2:])
  tmp = out.copy()
  out[:, :, 1:-1] = 0.5 * tmp[:, :, 1:-1] + 0.25 * (tmp[:, :, :-2] + tmp[:, :, 2:])
  return out
