"""``make demo``'s table (sweep kind ``demo``: experiments/sweeps/demo.py).

Accuracies with their intervals come first; ISR's effect is the paired
difference (same seed: same data split, partition and initial model). The
CL–FL gap ``D = acc_CL − acc_FL`` and its change follow, and a gap that shrank
while both CL and FL fell is flagged: a ratio of two gaps is no improvement
when both ends moved down.
"""

from __future__ import annotations

import math

from experiments.sections.common import by_seed, provenance, select
from experiments.stats import mean_interval, paired_difference
from isr_jax.analysis import relative_gap_reduction

ACC = "test/accuracy"
MODES = ("cl", "fl", "hybrid")


def accuracies(records: list[dict]) -> dict[tuple[str, bool], dict[int, float]]:
  """``{(mode, isr on): {seed: final test accuracy}}`` of the finished runs."""
  return {(mode, isr): by_seed(select(records, grid=mode, isr="on" if isr else "off"), ACC)
          for mode in MODES for isr in (False, True)}


def format_table(acc: dict[tuple[str, bool], dict[int, float]], num_test: int) -> str:
  """The demo's result in Markdown: accuracies (%) with 95 % intervals, then the gap."""
  lines = ["| mode | without ISR | with ISR | ISR − without (paired) |", "|---|---|---|---|"]
  for mode in MODES:
    off, on = acc[(mode, False)], acc[(mode, True)]
    lines.append(f"| {mode.upper()} | {mean_interval(list(off.values())).format(100)} | "
                 f"{mean_interval(list(on.values())).format(100)} | "
                 f"{paired_difference(on, off).format(100, signed=True)} |")
  gap = {isr: {s: acc[("cl", isr)][s] - acc[("fl", isr)][s] for s in acc[("fl", isr)]
               if s in acc[("cl", isr)]} for isr in (False, True)}
  gap_off, gap_on = (mean_interval(list(gap[i].values())) for i in (False, True))
  change = paired_difference(gap[False], gap[True])
  reduction = relative_gap_reduction(gap_off.mean, gap_on.mean)
  relative = "n/a: no gap without ISR" if math.isnan(reduction) else f"{100 * reduction:+.1f} %"
  fell = [m for m in ("cl", "fl")
          if paired_difference(acc[(m, True)], acc[(m, False)]).mean < 0]
  # The gap shrinks when FL gains on CL; if FL fell too, only CL's larger fall shrank it.
  flag = (" — **both ends fell**: the gap shrank only because CL lost more than FL"
          if change.mean > 0 and len(fell) == 2 else "")
  seeds = len(set().union(*acc.values()))
  lines += [
      "",
      f"CL–FL gap D = acc_CL − acc_FL (points): without ISR {gap_off.format(100)}, with ISR "
      f"{gap_on.format(100)}; shrink D_without − D_with {change.format(100, signed=True)} "
      f"(relative {relative}){flag}.",
      "",
      f"Mean ± 95 % interval over {seeds} seeds (Student t). One test example is "
      f"{100 / num_test:.2f} points ({num_test} test examples); a difference whose interval "
      "contains 0 is not resolved by these seeds.",
  ]
  return "\n".join(lines)


def blocks(records: list[dict], figures: str) -> dict[str, str]:
  del figures
  sweep = records[0]["sweep"]
  done = [r for r in records if r["status"] == "done"]
  if not done:
    return {f"{sweep}/setup": provenance(records)}
  num_test = int(done[0]["final"]["test/num_examples"])
  return {f"{sweep}/setup": provenance(records),
          f"{sweep}/table": format_table(accuracies(records), num_test)}
