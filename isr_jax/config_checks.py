"""Checks of single config values, each failing with one :class:`ConfigError` line.

The line names the setting and what is allowed, so a mistyped flag is answered
before anything is built. Used by the run's config (:mod:`isr_jax.config`), the
optimizers and every algorithm's own settings.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from isr_jax.errors import ConfigError


def check_number(value, setting: str, *, low=None, high=None, low_open=False, high_open=False):
  """``value`` as a float; a ConfigError unless it is finite and inside the interval."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{setting}={value!r} must be a number") from None
  bad = not math.isfinite(v)
  if low is not None:
    bad |= v <= low if low_open else v < low
  if high is not None:
    bad |= v >= high if high_open else v > high
  if bad:
    left = f"({'-inf' if low is None else low}" if low_open or low is None else f"[{low}"
    right = f"{'inf' if high is None else high})" if high_open or high is None else f"{high}]"
    interval = f"{left}, {right}"
    raise ConfigError(f"{setting}={value!r} must be in {interval}")
  return v


def check_one_of(value: Any, allowed: Collection, setting: str) -> Any:
  """``value``; a ConfigError unless it is one of ``allowed``."""
  if value not in allowed:
    raise ConfigError(f"{setting}={value!r} is not one of {sorted(allowed, key=str)}")
  return value


def check_integer(value, setting: str, low: int = 1) -> int:
  """``value`` as an int; a ConfigError unless it is a whole number ``>= low``.

  Accepts ``3.0`` (what a flag parser may hand over), refuses ``3.5`` and ``True``.
  """
  v = check_number(value, setting, low=low)
  if isinstance(value, bool) or v != int(v):
    raise ConfigError(f"{setting}={value!r} must be an integer >= {low}")
  return int(v)


def check_flag(value, setting: str) -> bool:
  """``value``; a ConfigError unless it is ``True`` or ``False``."""
  return check_one_of(value, (False, True), setting)


def check_local_sgd(config, algorithm: str, why: str) -> dict[str, Any]:
  """The clients' SGD ``{momentum, nesterov}``; a ConfigError for any other optimizer.

  For algorithms whose quantities exist only under plain local SGD (with
  momentum, Nesterov and weight decay, which add to the gradient); ``why`` says
  which quantity, for the error line.
  """
  name = config.client_optimizer.name
  if name != "sgd":
    raise ConfigError(f"fl.algorithm={algorithm!r} needs client_optimizer.name='sgd' "
                      f"(got {name!r}): {why}")
  momentum = check_number(config.client_optimizer.momentum, "client_optimizer.momentum", low=0,
                          high=1, high_open=True)
  return dict(momentum=momentum, nesterov=bool(config.client_optimizer.get("nesterov", False)))
