"""The styles of the synthetic cities: what sets one city's street scenes apart from another's.

The styles depend only on the seed and the number of cities, so the train and
test streams of :func:`isr_jax.data.street_scenes.generate_street_scenes` share them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from isr_jax.data.street_paints import FACADE_COLOURS, SIGN_COLOURS, SKY_COLOURS


@dataclasses.dataclass(frozen=True)
class CityStyle:
  """The look and the make-up of one synthetic city (means; images jitter around them).

  Attributes:
    horizon: horizon row as a fraction of the image height.
    road_half_width: half the road width, metres.
    sidewalk_width: width of each sidewalk, metres.
    building_density: probability that a block along the street has a building.
    building_height: mean building height, metres.
    car_rate: mean number of cars per image (Poisson, at most 8).
    pedestrian_rate: mean number of pedestrians per image (Poisson, at most 8).
    tree_rate: mean number of trees per image (Poisson, at most 8).
    pole_rate: mean number of poles per image (Poisson, at most 4).
    noise: standard deviation of the per-pixel Gaussian noise.
    brightness: mean illumination multiplier.
    haze: strength of the haze around the horizon, in ``[0, 1)``.
    hood: height of the ego vehicle's hood as a fraction of the image height (0: none).
    sky: sky colour, RGB in ``[0, 1]``.
    facade: mean facade colour.
    road: road colour.
    sidewalk: sidewalk colour.
    terrain: terrain colour.
    vegetation: foliage colour.
    sign: traffic-sign colour.
    lane: lane-mark colour.
    tint: multiplicative colour cast of the whole image.
  """

  horizon: float
  road_half_width: float
  sidewalk_width: float
  building_density: float
  building_height: float
  car_rate: float
  pedestrian_rate: float
  tree_rate: float
  pole_rate: float
  noise: float
  brightness: float
  haze: float
  hood: float
  sky: tuple[float, float, float]
  facade: tuple[float, float, float]
  road: tuple[float, float, float]
  sidewalk: tuple[float, float, float]
  terrain: tuple[float, float, float]
  vegetation: tuple[float, float, float]
  sign: tuple[float, float, float]
  lane: tuple[float, float, float]
  tint: tuple[float, float, float]


# Ranges of the scalar style parameters; cities are spread over them by a stratified draw.
_STYLE_RANGES = {
    "horizon": (0.36, 0.52),
    "road_half_width": (2.5, 7.0),
    "sidewalk_width": (1.0, 4.0),
    "building_density": (0.25, 0.95),
    "building_height": (6.0, 30.0),
    "car_rate": (0.5, 6.0),
    "pedestrian_rate": (0.3, 5.0),
    "tree_rate": (0.2, 6.0),
    "pole_rate": (0.6, 3.5),
    "noise": (0.01, 0.06),
    "brightness": (0.65, 1.15),
    "haze": (0.0, 0.45),
    "hood": (-0.10, 0.12),  # Clipped at 0: about half of the cities show no hood.
}


def city_styles(num_cities: int, seed: int) -> tuple[CityStyle, ...]:
  """Draws the styles of ``num_cities`` synthetic cities.

  Every scalar parameter is stratified: its range is cut into ``num_cities``
  equal bins, each city takes a random point of a different bin (bins are
  dealt in a random order per parameter), so that the cities spread over every
  range instead of clustering.

  Args:
    num_cities: number of cities, >= 1.
    seed: seed of the draw.

  Returns:
    One :class:`CityStyle` per city.
  """
  rng = np.random.default_rng([seed, 0x5717])
  scalars = {}
  for name, (low, high) in _STYLE_RANGES.items():
    bins = (rng.permutation(num_cities) + rng.random(num_cities)) / num_cities
    scalars[name] = low + (high - low) * bins
  scalars["hood"] = np.maximum(scalars["hood"], 0.0)
  sky_weights = rng.dirichlet(np.full(len(SKY_COLOURS), 0.3), num_cities)
  # Each city leans on a different facade colour (round-robin over a shuffled list).
  facade_index = rng.permutation(len(FACADE_COLOURS))[np.arange(num_cities) % len(FACADE_COLOURS)]

  def colour(base, spread):
    return np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0.02, 0.98)

  styles = []
  for c in range(num_cities):
    lane = (0.92, 0.92, 0.88) if rng.random() < 0.6 else (0.90, 0.78, 0.20)
    styles.append(
        CityStyle(
            **{name: float(values[c]) for name, values in scalars.items()},
            sky=_rgb(colour(sky_weights[c] @ SKY_COLOURS, 0.04)),
            facade=_rgb(colour(FACADE_COLOURS[facade_index[c]], 0.05)),
            road=_rgb(colour(np.full(3, rng.uniform(0.22, 0.45)), 0.03)),
            sidewalk=_rgb(colour((0.62, 0.56, 0.54), 0.08)),
            terrain=_rgb(colour((0.48, 0.55, 0.30), 0.06)),
            vegetation=_rgb(colour((0.20, 0.42, 0.16), 0.05)),
            sign=_rgb(SIGN_COLOURS[rng.integers(len(SIGN_COLOURS))]),
            lane=lane,
            tint=_rgb(np.clip(1.0 + rng.normal(0, 0.06, 3), 0.85, 1.15)),
        )
    )
  return tuple(styles)


def _rgb(values) -> tuple[float, float, float]:
  r, g, b = (float(v) for v in values)
  return (r, g, b)
