r"""Runs one experiment from a config file.

  python -m experiments.main --config=experiments/configs/digits.py:fl,isr \
      --workdir=runs/digits_fl_isr

Any setting can be overridden on the command line, e.g.
``--config.fl.algorithm=fedavg --config.num_rounds=10``. Starting the same
command again resumes from the workdir's latest checkpoint; a finished run is
reported, not repeated. SIGTERM or Ctrl-C finishes and saves the round in
progress, then exits with 128 + the signal's number.

Every error a user can act on (a bad setting, a missing dataset, a diverged
run, a damaged checkpoint, an unusable workdir) ends the run with one
``error: ...`` line and exit code 1.

Multi-host (GPU nodes, TPU pods): start the same command on every host with
``--multihost``; ``jax.distributed.initialize`` finds the cluster (SLURM, TPU)
by itself, or takes ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (see launch/).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common_flags import WORKDIR
from experiments.config_files import parse_flags
from isr_jax.errors import (
  CheckpointError,
  ConfigError,
  DataNotFoundError,
  NaNLossError,
  Preempted,
  WorkdirError,
)
from isr_jax.progress import headline
from isr_jax.train import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "An experiments/configs file with its preset words (digits.py:fl,isr); "
    "'python -m experiments.settings' lists the files, their presets, the algorithms, datasets "
    "and models, and every setting with its default and allowed values.", lock_config=True)
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize first.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config"])


class _NoOrbaxTracebacks(std_logging.Filter):
  """Drops the tracebacks Orbax's background threads log when a save fails.

  The failure also reaches ``train_and_evaluate``, which reports it (a full
  disk, a read-only workdir) in one line; the traceback would bury that line.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _check_platforms() -> None:
  """One ``error:`` line when ``JAX_PLATFORMS`` names a platform this machine cannot start."""
  wanted = os.environ.get("JAX_PLATFORMS", "")
  if not wanted:
    return
  try:
    jax.devices()
  except (RuntimeError, AssertionError) as e:  # 'cuda' without its plugin fails an assert
    reason = str(e).split(" (set JAX_PLATFORMS")[0].strip() or "its plugin is not installed"
    sys.exit(f"error: JAX_PLATFORMS={wanted!r} cannot be used here ({reason}): unset it to "
             "let JAX choose, or name a platform this machine has (e.g. cpu)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not WORKDIR.value:
    raise app.UsageError("--workdir: where the run's metrics, checkpoints and summary go")
  # Library progress at INFO; absl (and Orbax, which logs through it) at WARNING.
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("absl").addFilter(_NoOrbaxTracebacks())
  std_logging.getLogger("isr_jax").setLevel(std_logging.INFO)
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  _check_platforms()
  try:
    result = train_and_evaluate(_CONFIG.value, WORKDIR.value)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
    print("stopped: interrupted; the checkpoints already saved are kept", file=sys.stderr)
    sys.exit(130)
  except (ConfigError, DataNotFoundError, NaNLossError, CheckpointError, WorkdirError) as e:
    sys.exit(f"error: {e}")
  # The headline (personal accuracy first for a personalized run); every metric is
  # in the workdir's metrics.jsonl, each client's accuracy in its personal.jsonl.
  reused = " (finished earlier, reused)" if result["finished_earlier"] else ""
  print(f"done{reused}: {headline(result['metrics']) or 'nothing evaluated'} — {WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
