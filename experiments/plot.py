r"""Overlays the learning curves of several workdirs in one PNG.

  python -m experiments.plot --workdirs=runs/fl,runs/fl_isr,runs/hybrid --out=cmp.png
  python -m experiments.plot runs/* --out=cmp.png

Each workdir is one line per panel, labelled with its name (or ``--labels``);
the title says what the runs share (algorithm, dataset, partition, ISR: from
their ``config.json``), or ``--title``.
The panels are those of ``isr_jax.plotting.CURVE_PANELS`` that any of the runs
logged — accuracy, losses, client drift, hybrid α, cos(g_CL, g_FL) — or
``--metrics``. Every run already draws its own ``learning_curves.png``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from experiments.common_flags import OUT, WORKDIRS
from isr_jax.plotting import plot_workdirs

_LABELS = flags.DEFINE_list("labels", [], "Legend entries, one per workdir.")
_METRICS = flags.DEFINE_list("metrics", [], "Metric keys to draw (default: all present).")
_TITLE = flags.DEFINE_string("title", "", "Figure title.")


def main(argv):
  workdirs = WORKDIRS.value + argv[1:]
  out = OUT.value or "learning_curves.png"
  if not workdirs:
    raise app.UsageError("give the workdirs: --workdirs=a,b or as arguments")
  missing = [w for w in workdirs if not os.path.isfile(os.path.join(w, "metrics.jsonl"))]
  if missing:
    sys.exit(f"error: no metrics.jsonl in {', '.join(missing)}")
  try:
    panels = plot_workdirs(workdirs, out, labels=_LABELS.value or None,
                           metrics=_METRICS.value or None, title=_TITLE.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"{out}: {len(workdirs)} runs, panels {', '.join(panels)}")


if __name__ == "__main__":
  app.run(main)
