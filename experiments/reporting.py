"""Small helpers shared by the experiment drivers: runs that may diverge, mean ± std, CSV."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence

from isr_jax.errors import NaNLossError
from isr_jax.train import train_and_evaluate
from isr_jax.workdir import write_atomic


def train_unless_diverged(config, workdir: str, label: str) -> dict | None:
  """``train_and_evaluate``'s result, or ``None`` (said on stdout) if the run diverged.

  One diverged run must not cost a driver its other runs: the tables report it
  (:func:`divergence_note`) and average over the runs that finished.
  """
  try:
    return train_and_evaluate(config, workdir)
  except NaNLossError as e:
    print(f"  {label} DIVERGED: {e}", flush=True)
    return None


def divergence_note(row: dict) -> str:
  """`` (diverged in k of n seeds)`` for a table row with ``diverged`` > 0, else empty."""
  k = row["diverged"]
  return f" (diverged in {k} of {k + row['seeds']} seeds)" if k else ""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value, NaN for none)."""
  values = list(values)
  if not values:
    return math.nan, math.nan
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float, std: float, digits: int = 4) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(rows: list[dict], path: str) -> None:
  """Rows of equal keys as a CSV file with a header, replaced all at once."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(path, text.getvalue())
