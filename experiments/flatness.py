r"""The flatness of finished runs' global models: the top eigenvalue of the loss Hessian.

  python -m experiments.flatness --workdirs=runs/fedavg,runs/fedsol [--examples=1000] \
      [--batch=500]

FedSoL (Figure 4) compares FedAvg, FedASAM and FedSoL by the dominant
eigenvalue λ₁ of the Hessian of the global model's training loss: the flatter
the minimum, the smaller λ₁. For each workdir written by
``isr_jax.train.train_and_evaluate`` this rebuilds the experiment from its
``config.json``, restores its latest checkpoint, and measures λ₁ of the mean
cross-entropy of the global model (``state.params["model"]``, no ISR terms) over
a fixed subset of ``--examples`` training examples, drawn with ``--seed``
(:func:`isr_jax.flatness.top_hessian_eigenvalue`: power iteration on
Hessian-vector products, which finds the eigenvalue of largest magnitude). It
writes ``<workdir>/flatness.json`` and prints one line per workdir.

A workdir without ``config.json`` or a checkpoint, or whose checkpoint, data or
config cannot be used, gets one ``error:`` line and is skipped; the others are
still measured, and the exit code is then 1.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging

from experiments.common_flags import BATCH, EXAMPLES, REDO, SEED, WORKDIRS
from experiments.finished_runs import (
  load_run,
  measure_each,
  skipping,
  training_examples,
)
from isr_jax import workdir as workdir_files
from isr_jax.flatness import model_cross_entropy, top_hessian_eigenvalue

FLATNESS_FILE = "flatness.json"

_ITERS = flags.DEFINE_integer("iters", 100, "Most power-iteration steps (Hessian-vector products).")
_TOL = flags.DEFINE_float("tol", 1e-4, "Relative change of the estimate that stops the iteration.")


def measure(workdir: str, *, examples: int, batch_size: int, seed: int = 0,
            num_iters: int = 100, tol: float = 1e-4) -> dict:
  """Measures one workdir's global model and writes ``<workdir>/flatness.json``.

  Returns:
    What was written: ``top_hessian_eigenvalue``, ``examples``, ``iterations``,
    ``relative_change``, ``round``.

  Raises:
    Skipped: no config.json, no checkpoint, or one of the library's errors
      (one line each).
  """
  run = load_run(workdir)
  with skipping(workdir):
    x, y, ignore_index = training_examples(run.config, examples, seed)
    loss_fn = model_cross_entropy(run.experiment.apply, x, y, batch_size=batch_size,
                                  ignore_index=ignore_index)
    result = jax.device_get(top_hessian_eigenvalue(
        loss_fn, run.state.params["model"], key=jax.random.PRNGKey(seed), num_iters=num_iters,
        tol=tol))
    record = {"top_hessian_eigenvalue": float(result.eigenvalue), "examples": int(len(y)),
              "iterations": int(result.iterations),
              "relative_change": float(result.relative_change), "round": int(run.state.round)}
    workdir_files.write_json(os.path.join(workdir, FLATNESS_FILE), record)
  return record


def _line(workdir: str, r: dict, tol: float) -> str:
  converged = "" if not r["relative_change"] >= tol else " (not converged: raise --iters)"
  return (f"{workdir}: top Hessian eigenvalue {r['top_hessian_eigenvalue']:.6g} at round "
          f"{r['round']} over {r['examples']} examples, {r['iterations']} iterations, "
          f"relative change {r['relative_change']:.2g}{converged} -> "
          f"{os.path.join(workdir, FLATNESS_FILE)}")


def main(argv):
  workdirs = WORKDIRS.value + argv[1:]
  if not workdirs:
    raise app.UsageError("give the workdirs: --workdirs=a,b or as arguments")
  if EXAMPLES.value < 1 or BATCH.value < 1 or _ITERS.value < 1:
    sys.exit("error: --examples, --batch and --iters must be at least 1")
  logging.set_verbosity(logging.WARNING)  # absl and Orbax, which logs through it
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  measure_one = functools.partial(measure, examples=EXAMPLES.value, batch_size=BATCH.value,
                                  seed=SEED.value, num_iters=_ITERS.value, tol=_TOL.value)
  describe = lambda workdir, record: _line(workdir, record, _TOL.value)
  if measure_each(workdirs, measure_one, describe, FLATNESS_FILE, redo=REDO.value):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
