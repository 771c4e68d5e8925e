"""Which taps get intermediate supervision/regularisation, and with what weights.

Selection is architecture-agnostic (OmniISR paper §3.1, §4.4): a model lists
its tap names in block order; ISR picks taps either by explicit name or by the
presets of the paper's ablations —

* ``count`` M ∈ 1..5 points (§4.4.1), default ``O(log depth)``: ``max(1, ⌊log2 n⌋)``;
* ``spacing`` s ∈ {1, 2, 3}: adjacent chosen taps are s positions apart
  ("1-, 2-, 3-base", §4.4.2);
* ``placement``: the block of M taps sits at the input end, the middle, or the
  output end of the tap list (input-, middle-, output-biased, §4.4.3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from isr_jax.errors import ConfigError

PLACEMENTS = ("input", "middle", "output")
MAX_PRESET_TAPS = 5


class TapTerm(NamedTuple):
  """One ISR point: the tap and its weights ``α_m`` (MI) and ``λ_m`` (NE)."""

  name: str
  mi_weight: float
  ne_weight: float


class ISRSpec(NamedTuple):
  """The ISR part of Eq. 5; hashable, so it can be a static argument under jit.

  Attributes:
    terms: the taps and their weights.
    ne_normalize: divide each NE term by ``log C_m``.
    decouple_adapters: α_m weighs only the MI term's pull on the backbone; the
      adapter ``φ_m`` gets ``∇_φ L_MI^m`` unscaled (see :func:`isr_jax.losses.isr_loss`).
      ``False`` is Eq. 5 differentiated literally, where the adapter's update is
      scaled by α_m too.
  """

  terms: tuple[TapTerm, ...]
  ne_normalize: bool = False
  decouple_adapters: bool = True

  @property
  def tap_names(self) -> tuple[str, ...]:
    return tuple(t.name for t in self.terms)

  @property
  def adapter_taps(self) -> tuple[str, ...]:
    """Taps that need an adapter (α_m > 0)."""
    return tuple(t.name for t in self.terms if t.mi_weight > 0)


def default_tap_count(num_taps: int) -> int:
  """The paper's recommendation M = O(log depth)."""
  return max(1, min(MAX_PRESET_TAPS, int(math.log2(max(num_taps, 1)))))


def select_taps(
    tap_names: Sequence[str],
    *,
    names: Sequence[str] = (),
    count: int = 0,
    spacing: int = 1,
    placement: str = "input",
) -> tuple[str, ...]:
  """Chooses ISR taps by explicit ``names`` or by the (count, spacing, placement) preset.

  Args:
    tap_names: the model's taps in block order.
    names: explicit tap names; when given, the preset arguments are ignored.
    count: number of points M (0 = :func:`default_tap_count`).
    spacing: distance between adjacent chosen taps, in tap positions.
    placement: ``"input"``, ``"middle"`` or ``"output"``.

  Returns:
    The chosen tap names, in block order.
  """
  tap_names = tuple(tap_names)
  if names:
    unknown = [n for n in names if n not in tap_names]
    if unknown:
      raise ConfigError(
          f"isr.taps: {unknown} not among the model's taps {list(tap_names)}"
      )
    if len(set(names)) != len(names):
      raise ConfigError(f"isr.taps={list(names)} names a tap twice")
    return tuple(n for n in tap_names if n in set(names))
  if placement not in PLACEMENTS:
    raise ConfigError(f"isr.placement={placement!r} is not one of {list(PLACEMENTS)}")
  if spacing < 1:
    raise ConfigError(f"isr.spacing={spacing} must be a positive integer (1, 2 or 3 base)")
  n = len(tap_names)
  count = count or default_tap_count(n)
  if count < 1:
    raise ConfigError(f"isr.num_taps={count} must be >= 1")
  span = spacing * (count - 1) + 1
  if span > n:
    raise ConfigError(
        f"isr.num_taps={count} with isr.spacing={spacing} spans {span} taps but the model "
        f"has {n}: {list(tap_names)}"
    )
  start = {"input": 0, "middle": (n - span) // 2, "output": n - span}[placement]
  return tuple(tap_names[start + spacing * j] for j in range(count))


def _per_tap(value, taps: Sequence[str], setting: str) -> tuple[float, ...]:
  values = (value,) * len(taps) if isinstance(value, (int, float)) else tuple(value)
  if len(values) != len(taps):
    raise ConfigError(
        f"{setting} has {len(values)} values but {len(taps)} taps are selected: {list(taps)}"
    )
  for v in values:
    if not math.isfinite(float(v)) or v < 0:
      raise ConfigError(f"{setting}={v} must be a finite number >= 0")
  return tuple(float(v) for v in values)


def make_isr_spec(
    tap_names: Sequence[str],
    *,
    enabled: bool,
    taps: Sequence[str] = (),
    num_taps: int = 0,
    spacing: int = 1,
    placement: str = "input",
    mi_weight: float | Sequence[float] = 0.1,
    ne_weight: float | Sequence[float] = 0.01,
    ne_normalize: bool = False,
    decouple_adapters: bool = True,
) -> ISRSpec | None:
  """Builds the ISR spec for a model, or ``None`` when ISR is off.

  ``mi_weight`` (α_m) and ``ne_weight`` (λ_m) are one number for every tap or one per selected tap.
  """
  if not enabled:
    return None
  chosen = select_taps(tap_names, names=taps, count=num_taps, spacing=spacing,
                       placement=placement)
  mi_weights = _per_tap(mi_weight, chosen, "isr.mi_weight")
  ne_weights = _per_tap(ne_weight, chosen, "isr.ne_weight")
  terms = tuple(TapTerm(n, a, m)
                for n, a, m in zip(chosen, mi_weights, ne_weights, strict=True))
  return ISRSpec(terms=terms, ne_normalize=bool(ne_normalize),
                 decouple_adapters=bool(decouple_adapters))
