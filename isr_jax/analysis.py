"""Quantities the papers report, computed from results (OmniISR paper §3.3–§4; methods §3)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def cl_fl_gap(metric_cl: float, metric_fl: float) -> float:
  """``D = metric_CL − metric_FL`` (smaller is better unification, §4.2.1 RQ4)."""
  return float(metric_cl) - float(metric_fl)


def relative_gap_reduction(gap_without: float, gap_with: float) -> float:
  """``(D_without − D_with) / D_without``; NaN when there is no gap to reduce (D_without ≤ 0)."""
  if gap_without <= 0:
    return math.nan
  return (gap_without - gap_with) / gap_without


def paired_wins(
    results: Mapping[tuple[str, bool], Mapping[str, float]],
    metrics: Sequence[str],
    *,
    higher_is_better: bool = True,
) -> tuple[int, int]:
  """Counts the (algorithm, metric) pairs where +ISR beats −ISR (the paper's 37/48).

  Args:
    results: ``{(algorithm, isr_enabled): {metric: value}}``.
    metrics: which metrics to compare.
    higher_is_better: direction of the comparison.

  Returns:
    ``(wins, comparisons)`` over algorithms that have both an ISR-on and an
    ISR-off result; a NaN value (a run that diverged) is no comparison.
  """
  wins = total = 0
  for alg in sorted({a for a, _ in results}):
    if (alg, True) not in results or (alg, False) not in results:
      continue
    for m in metrics:
      on, off = results[(alg, True)][m], results[(alg, False)][m]
      if math.isnan(on) or math.isnan(off):
        continue
      total += 1
      wins += int(on > off if higher_is_better else on < off)
  return wins, total


def escape_time_bound(*, eta: float, gamma: float, c0: float, radius: float, y0: float,
                      b_eff: float, sigma_eff: float, delta: float) -> float:
  """Theorem 6 (Eq. 21) saddle-escape bound, with methods §3's reading of the radicals.

  ``T_esc(δ) ≤ (1/(ηγ)) · ln(C_0 R / (y_0 − η C_B − η C_σ(δ)))`` with
  ``C_B = B_eff/γ`` and ``C_σ(δ) = σ_eff · sqrt(ln(2/δ) / (ηγ))``. Returns NaN
  where the bound is undefined (denominator ≤ 0, or a non-positive argument of
  the logarithm) — the missing curve segments of the paper's Fig. 7 — never a
  negative time.
  """
  if eta <= 0 or gamma <= 0 or not 0 < delta < 1:
    return math.nan
  c_b = b_eff / gamma
  c_sigma = sigma_eff * math.sqrt(math.log(2.0 / delta) / (eta * gamma))
  denom = y0 - eta * c_b - eta * c_sigma
  if denom <= 0 or c0 * radius <= 0:
    return math.nan
  t = math.log(c0 * radius / denom) / (eta * gamma)
  return max(t, 0.0)
