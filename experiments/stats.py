"""Means with 95 % confidence intervals over seeds, and paired differences.

With n seeds the interval is Student's t: ``mean ± t_{0.975, n−1} · s / √n``.
Three seeds give wide intervals (t = 4.30): a difference whose interval
contains 0 is not resolved by the seeds run, whatever its mean. A paired
difference pairs the runs that share a seed — the same partition, the same
initial model, the same client sampling — and so removes what the seed alone
moves.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from scipy import stats as scipy_stats

CONFIDENCE = 0.95


class Interval(NamedTuple):
  """``mean ± half_width`` over ``n`` values (half_width NaN when n < 2)."""

  mean: float
  half_width: float
  n: int

  @property
  def excludes_zero(self) -> bool:
    return self.n > 1 and abs(self.mean) > self.half_width

  def format(self, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``"84.12 ± 1.03"`` (``scale=100`` for percent); ``n = 1`` shows the value alone."""
    if self.n == 0:
      return "–"
    sign = "+" if signed else ""
    mean = f"{self.mean * scale:{sign}.{digits}f}"
    if self.n < 2:
      return f"{mean} (n = 1)"
    return f"{mean} ± {self.half_width * scale:.{digits}f}"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
  """The mean of ``values`` and the half-width of its Student-t interval."""
  values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
  n = len(values)
  if n == 0:
    return Interval(math.nan, math.nan, 0)
  mean = statistics.fmean(values)
  if n == 1:
    return Interval(mean, math.nan, 1)
  t = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1))
  return Interval(mean, t * statistics.stdev(values) / math.sqrt(n), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float],
                      confidence: float = CONFIDENCE) -> Interval:
  """``a − b`` over the seeds both have: the interval of the per-seed differences."""
  seeds = sorted(set(a) & set(b))
  return mean_interval([a[s] - b[s] for s in seeds], confidence)
