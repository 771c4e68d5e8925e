"""ISR across the FL algorithms (sweep kind ``zoo``: experiments/sweeps/zoo.py).

For each algorithm, the global model's final test accuracy without and with
ISR and the paired difference (same seed: same partition, initial model and
client sampling), the macro-F1 difference, the bytes the sampled clients send
and receive per round, and OmniISR's paired-wins count: the (algorithm,
metric) pairs where +ISR's mean beats −ISR's, over accuracy, mF1, mPre, mRec.
"""

from __future__ import annotations

from experiments.sections.common import (
  by_seed,
  interval,
  labels_of,
  markdown_table,
  metric,
  percent,
  provenance,
  select,
)
from experiments.stats import mean_interval, paired_difference
from isr_jax.analysis import paired_wins

METRICS = ("accuracy", "mF1", "mPre", "mRec")


def blocks(records: list[dict], figures: str) -> dict[str, str]:
  del figures
  rows, means = [], {}
  resolved = {"+": [], "−": []}
  for name in labels_of(records, "algorithm"):
    off, on = select(records, algorithm=name, isr="off"), select(records, algorithm=name, isr="on")
    diff = paired_difference(by_seed(on, "test/accuracy"), by_seed(off, "test/accuracy"))
    if diff.excludes_zero:
      resolved["+" if diff.mean > 0 else "−"].append(name)
    f1 = paired_difference(by_seed(on, "test/mF1"), by_seed(off, "test/mF1"))
    done = [r for r in on if r["status"] == "done"]
    up = metric(done[0], "comm/up_bytes") if done else None
    down = metric(done[0], "comm/down_bytes") if done else None
    rows.append([name, percent(interval(off, "test/accuracy")),
                 percent(interval(on, "test/accuracy")), percent(diff, signed=True),
                 percent(f1, signed=True),
                 "–" if up is None else f"{up / 1e6:.3f}",
                 "–" if down is None else f"{down / 1e6:.3f}"])
    for isr, runs in ((False, off), (True, on)):
      means[(name, isr)] = {m: mean_interval(list(by_seed(runs, f"test/{m}").values())).mean
                            for m in METRICS}
  table = markdown_table(["algorithm", "accuracy −ISR", "accuracy +ISR", "+ISR − (−ISR)",
                          "Δ mF1", "MB up / round (+ISR)", "MB down / round (+ISR)"], rows)
  wins, total = paired_wins(means, METRICS)
  higher, lower = (", ".join(resolved[k]) or "none" for k in ("+", "−"))
  summary = (f"Paired wins of +ISR over −ISR across (algorithm × metric), on the means: "
             f"**{wins}/{total}** (OmniISR reports 37/48 on segmentation). Accuracy "
             f"differences whose interval excludes 0: higher with ISR for {higher}; lower "
             f"for {lower}.")
  return {"zoo/setup": provenance(records), "zoo/table": table, "zoo/summary": summary}
