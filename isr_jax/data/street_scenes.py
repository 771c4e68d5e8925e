"""A seeded procedural generator of synthetic street scenes for semantic segmentation.

The images are synthetic: nothing is downloaded or read from disk. Each image is
rendered by a pinhole camera at a fixed height above a flat ground plane:

* the horizon row and the vanishing point fix the perspective; every ground
  pixel gets a lateral coordinate in metres, which decides road (with dashed
  lane marks), sidewalks and, beyond them, terrain;
* building facades are vertical planes along both sidewalks, cut into blocks of
  random length, height and colour (with windows), and gaps between blocks;
* trees, poles with traffic signs, pedestrians (on sidewalks) and cars (on the
  road, with cabin, windows, wheels and tail lights) are placed at random
  distances and drawn far to near, so nearer objects are larger and occlude;
* some cities show the ego vehicle's hood at the bottom, labelled
  :data:`~isr_jax.data.street_paints.IGNORE_INDEX` like Cityscapes' ego vehicle;
* lighting, haze, low-frequency illumination, per-pixel noise and a small blur
  make the appearance of a class vary.

Every "city" has its own style (:class:`~isr_jax.data.street_styles.CityStyle`):
horizon height, road and sidewalk widths, building density/height/colour, car,
pedestrian, tree and pole densities, sky colour, lighting, haze, noise and hood.
The styles spread over their ranges (a stratified draw), so cities differ in
both class statistics and appearance; the city of every image is returned as
its group, which gives a natural non-IID federated partition (one client per
city).

Everything is vectorised over a chunk of images: each drawing step writes one
``uint8`` "paint" map, which is turned into labels and colours by table lookups.

The parts: :mod:`isr_jax.data.street_paints` (classes, paint ids, colour
prototypes), :mod:`isr_jax.data.street_styles` (the cities),
:mod:`isr_jax.data.street_layout` (camera and drawing) and
:mod:`isr_jax.data.street_render` (a chunk's labels and colours); this module
deals the images to cities and renders them chunk by chunk.
"""

from __future__ import annotations

import numpy as np

from isr_jax.data.street_render import render
from isr_jax.data.street_styles import city_styles
from isr_jax.errors import ConfigError

DEFAULT_IMAGE_SIZE = (64, 128)
"""Default ``(H, W)`` of the synthetic images."""

DEFAULT_NUM_CITIES = 6

_CHUNK = 128  # Images rendered at once; fixed so that results do not depend on memory.


def generate_street_scenes(
    num_images: int,
    *,
    seed: int,
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
    num_cities: int = DEFAULT_NUM_CITIES,
    stream: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Renders synthetic street scenes with per-pixel labels.

  The city styles depend only on ``seed`` and ``num_cities``; the images on
  ``seed``, ``stream`` and the other arguments. Two streams of one seed (for
  example train = 0 and test = 1) share the cities but not the images.

  Args:
    num_images: number of images, >= 0. Cities are dealt evenly (round-robin,
      then shuffled), so city sizes differ by at most one.
    seed: seed of the cities and of the images.
    image_size: ``(H, W)``, each >= 16.
    num_cities: number of cities, >= 1.
    stream: which independent stream of images of this seed to draw.

  Returns:
    ``(x, y, groups)``: images ``[N, H, W, 3]`` float32 in ``[0, 1]``, labels
    ``[N, H, W]`` int32 in ``[0, len(STREET_CLASSES))`` or :data:`IGNORE_INDEX`,
    and the city of each image ``[N]`` int32.

  Raises:
    ConfigError: a bad size, count or number of cities.
  """
  height, width = _check_size(image_size)
  if not isinstance(num_cities, (int, np.integer)) or num_cities < 1:
    raise ConfigError(f"dataset.num_cities={num_cities!r} must be an integer >= 1")
  if not isinstance(num_images, (int, np.integer)) or num_images < 0:
    raise ConfigError(f"synthetic_streets: num_images={num_images!r} must be an integer >= 0")
  styles = city_styles(num_cities, seed)
  rng = np.random.default_rng([seed, 0x1A6E, stream])
  groups = rng.permutation(np.arange(num_images) % num_cities).astype(np.int32)
  x = np.empty((num_images, height, width, 3), np.float32)
  y = np.empty((num_images, height, width), np.int32)
  for start in range(0, num_images, _CHUNK):
    stop = min(num_images, start + _CHUNK)
    chunk_rng = np.random.default_rng([seed, 0x1A6E, stream, start])
    x[start:stop], y[start:stop] = render(groups[start:stop], styles, height, width, chunk_rng)
  return x, y, groups


def _check_size(image_size) -> tuple[int, int]:
  try:
    height, width = (int(v) for v in image_size)
    ok = tuple(image_size) == (height, width) and min(height, width) >= 16
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ConfigError(
        f"dataset.image_size={image_size!r} must be (H, W) with integers >= 16 for "
        f"synthetic_streets"
    )
  return height, width
