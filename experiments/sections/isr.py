"""ISR and the CL–FL gap (sweeps ``isr_gap`` and ``isr_taps``, experiments/sweeps/isr_gap.py).

Accuracy is the mean of a run's last three evaluations (its record's ``late``
metrics; the final round's table is shown too). The gap of a variant v is
``D_v = acc_CL,v − acc_FL,v`` (OmniISR §4.2), per seed; its change against
ISR off is ``D_none − D_v`` (positive: ISR shrank the gap), paired by seed. A
gap can shrink because FL rose or because CL fell; the tables show both ends so
that a shrinking gap with both ends lower is seen for what it is.
"""

from __future__ import annotations

import os

from experiments.sections.common import (
  by_seed,
  figure_link,
  interval,
  labels_of,
  markdown_table,
  percent,
  provenance,
  select,
)
from experiments.sections.figures import plot_seed_bands
from experiments.stats import Interval, mean_interval, paired_difference

ACC = "test/accuracy"
# Accuracy compared: the mean of each run's last three evaluations (a record's "late"
# metrics): FedAvg under #C = 2 moves by 5-15 points between evaluations.
LATE = "late"
DIAGNOSTICS = "isr_diagnostics"  # a record's measurements by experiments.isr_diagnostics
SKEW_NAMES = {"iid": "IID", "dir01": "Dir(0.1)", "c2": "#C = 2"}
VARIANT_NAMES = {
    "none": "no ISR",
    "literal": "α = 0.1, Eq. 5 literal (old default)",
    "dec0.03": "decoupled, α = 0.03",
    "dec0.1": "decoupled, α = 0.1",
    "dec0.3": "decoupled, α = 0.3",
    "ne": "NE only (α = 0)",
}


def _gap_change(cl: list[dict], fl: list[dict], cl_none: list[dict],
                fl_none: list[dict]) -> tuple[Interval, Interval]:
  """``(D_v per seed, D_none − D_v per seed)`` as intervals over the shared seeds."""
  d_v = _gap_by_seed(cl, fl)
  return mean_interval(list(d_v.values())), paired_difference(_gap_by_seed(cl_none, fl_none),
                                                              d_v)


def _gap_by_seed(cl: list[dict], fl: list[dict]) -> dict[int, float]:
  a, b = by_seed(cl, ACC, LATE), by_seed(fl, ACC, LATE)
  return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def _abs_interval(iv: Interval) -> Interval:
  return iv._replace(mean=abs(iv.mean))


def _train_test(runs: list[dict], tap: str) -> str:
  """The adapter's accuracy (%) on the training batches, and on the test split if measured."""
  train = percent(interval(runs, f"train/mi_accuracy/{tap}"))
  test = interval(runs, f"adapter_test_accuracy/{tap}", DIAGNOSTICS)
  return train if test.n == 0 else f"{train} / {percent(test)}"


def _verdict(change: Interval, fl_change: Interval) -> str:
  """What the gap's change says, given what FL's own accuracy did (both paired by seed)."""
  if change.n < 2:
    return "one seed"
  if not change.excludes_zero:
    return "not resolved"
  if change.mean < 0:
    return "grew" + (", FL fell" if fl_change.excludes_zero and fl_change.mean < 0 else "")
  if fl_change.mean < 0:
    return "shrank, **both ends fell**"
  return "shrank, FL rose" if fl_change.excludes_zero else "shrank, FL not resolved"


def gap_blocks(records: list[dict], figures: str) -> dict[str, str]:
  """The accuracy, gap and adapter tables of the ``isr_gap`` sweep, and its figure."""
  cl_all = select(records, grid="cl")
  fl_all = select(records, grid="fl")
  variants = labels_of(records, "isr")
  skews = labels_of(fl_all, "skew")

  header = ["ISR", "CL", *(f"FL {SKEW_NAMES.get(s, s)}" for s in skews)]
  accuracy, accuracy_final = (markdown_table(header, [
      [VARIANT_NAMES.get(v, v), percent(interval(select(cl_all, isr=v), ACC, where)),
       *(percent(interval(select(fl_all, isr=v, skew=s), ACC, where)) for s in skews)]
      for v in variants]) for where in (LATE, "final"))

  gap_rows, findings = [], []
  cl_none = select(cl_all, isr="none")
  for s in skews:
    fl_none = select(fl_all, isr="none", skew=s)
    for v in variants:
      cl_v, fl_v = select(cl_all, isr=v), select(fl_all, isr=v, skew=s)
      gap, change = _gap_change(cl_v, fl_v, cl_none, fl_none)
      fl_change = paired_difference(by_seed(fl_v, ACC, LATE), by_seed(fl_none, ACC, LATE))
      cl_change = paired_difference(by_seed(cl_v, ACC, LATE), by_seed(cl_none, ACC, LATE))
      verdict = "reference" if v == "none" else _verdict(change, fl_change)
      gap_rows.append([
          SKEW_NAMES.get(s, s), VARIANT_NAMES.get(v, v), percent(gap),
          "–" if v == "none" else percent(change, signed=True),
          "–" if v == "none" else percent(cl_change, signed=True),
          "–" if v == "none" else percent(fl_change, signed=True), verdict])
      if v != "none" and change.excludes_zero:
        findings.append(
            f"- {SKEW_NAMES.get(s, s)}, {VARIANT_NAMES.get(v, v)}: the gap "
            f"{'shrinks' if change.mean > 0 else 'grows'} by {percent(_abs_interval(change))} "
            f"points (CL {percent(cl_change, signed=True)}, FL "
            f"{percent(fl_change, signed=True)}): {verdict}.")
  gap = markdown_table(
      ["skew", "ISR", "gap D = CL − FL", "D_none − D (shrink > 0)", "CL vs none",
       "FL vs none", "reading"], gap_rows)
  if not findings:
    findings.append("- No variant changes the gap by more than its interval, on any skew.")

  taps = sorted({k.split("/", 2)[2] for r in records for k in r.get("final", {})
                 if k.startswith("train/mi_accuracy/")})
  adapter_rows = []
  for v in variants:
    if v in ("none", "ne"):
      continue
    for tap in taps:
      row = [VARIANT_NAMES.get(v, v), f"`{tap}`",
             _train_test(select(cl_all, isr=v), tap)]
      row += [_train_test(select(fl_all, isr=v, skew=s), tap) for s in skews]
      adapter_rows.append(row)
  adapters = markdown_table(
      ["ISR", "tap", "CL", *(f"FL {SKEW_NAMES.get(s, s)}" for s in skews)], adapter_rows)

  drift_taps = [*taps, "features"]
  mechanism_rows = []
  for s in skews:
    for v in variants:
      runs = select(fl_all, isr=v, skew=s)
      row = [SKEW_NAMES.get(s, s), VARIANT_NAMES.get(v, v)]
      row += [interval(runs, f"tap_drift/{t}", DIAGNOSTICS).format(digits=3) for t in drift_taps]
      row += [interval(runs, f"client_cos_ce_mi/{t}", DIAGNOSTICS).format(digits=2)
              for t in taps]
      mechanism_rows.append(row)
  mechanism = markdown_table(
      ["skew", "ISR", *(f"drift at `{t}`" for t in drift_taps),
       *(f"cos(∇CE, ∇αMI) at `{t}`, clients" for t in taps)], mechanism_rows)

  figure = _figure(fl_all, variants, skews, figures, records[0]["sweep"])
  sweep = records[0]["sweep"]
  return {
      f"{sweep}/setup": provenance(records),
      f"{sweep}/accuracy": accuracy,
      f"{sweep}/accuracy_final": accuracy_final,
      f"{sweep}/gap": gap,
      f"{sweep}/findings": "\n".join(findings),
      f"{sweep}/adapters": adapters,
      f"{sweep}/mechanism": mechanism,
      f"{sweep}/figure": figure_link(
          figure, "FL test accuracy per round, mean and 95 % band over seeds"),
  }


def _figure(fl_all: list[dict], variants: list[str], skews: list[str], figures: str,
            sweep: str) -> str:
  path = os.path.join(figures, f"{sweep}_fl_accuracy.png")
  panels = {}
  for s in skews:
    panels[f"FL, {SKEW_NAMES.get(s, s)}"] = {
        VARIANT_NAMES.get(v, v): select(fl_all, isr=v, skew=s) for v in variants}
  return plot_seed_bands(panels, ACC, path, ylabel="test accuracy (%)",
                         title="LeNet-5 on Fashion-MNIST, FedAvg: test accuracy with and "
                               "without ISR (mean over seeds, 95 % band)")


def taps_blocks(records: list[dict], figures: str) -> dict[str, str]:
  """Where ISR supervises: FL accuracy and adapter accuracy per tap preset."""
  del figures
  rows = []
  none = by_seed(select(records, taps="none"), ACC, LATE)
  labels = labels_of(records, "taps")
  for label in sorted(labels, key=lambda label: label != "none"):  # the reference first
    runs = select(records, taps=label)
    taps = sorted({k.split("/", 2)[2] for r in runs for k in r.get("final", {})
                   if k.startswith("train/mi_accuracy/")})
    adapter = ", ".join(
        f"`{t}` {percent(interval(runs, f'train/mi_accuracy/{t}'))}" for t in taps)
    change = ("–" if label == "none" else
              percent(paired_difference(by_seed(runs, ACC, LATE), none), signed=True))
    rows.append(["no ISR" if label == "none" else label, percent(interval(runs, ACC, LATE)),
                 change, adapter or "–"])
  table = markdown_table(["taps (placement, count)", "FL #C = 2 accuracy (last 3 evaluations)",
                          "− no ISR (paired)", "adapter accuracy per tap (train)"], rows)
  sweep = records[0]["sweep"]
  return {f"{sweep}/setup": provenance(records), f"{sweep}/table": table}
