r"""Runs a grid of experiments × seeds, resumably, and collects them into one table.

  python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py --workdir=runs/isr_gap
  python -m experiments.sweep --config=experiments/configs/isr_gap.py:fl,c2 \
      --axis=isr.mi_weight=0.03,0.1,0.3 --set=isr.enabled=True --seeds=0,1 \
      --workdir=runs/alpha

``--sweep`` names a sweep file (``experiments/sweeps/``, see
:mod:`experiments.sweeps`); without it, ``--config`` and any number of
``--axis=<setting>=<v1>,<v2>,…`` make a one-grid sweep. ``--set`` overrides a
setting in every run. Every run trains in ``<workdir>/<run name>`` with
:func:`isr_jax.train.train_and_evaluate`, so starting the same command again
resumes the unfinished runs and reads back the finished ones. Several
processes may work on one sweep at once: each skips a run that another is
training (the workdir's lock, :func:`isr_jax.workdir.exclusive`), or they split
it statically with ``--shard=i/n``. ``--prior_records=experiments/results``
takes the runs that the committed records hold as done instead of training them
again, so a grid continues on another machine or in another session from what
was committed. Every config is built and
validated before the first run trains: a wrong setting stops the sweep in one
line. At the end (and with ``--collect``, without training) every run's record
goes into ``<workdir>/results.jsonl`` and ``results.csv``
(:mod:`experiments.records`), which ``experiments.report`` turns into tables.
"""

from __future__ import annotations

import ast
import json
import logging as std_logging
import os
import re
import sys

from absl import app, flags, logging

from experiments.common_flags import SEEDS, WORKDIR
from experiments.records import RESULTS_FILE, read_records
from experiments.sweeps import Grid, Run, Sweep, axis, expand
from experiments.sweeps.runner import build_config, execute, load_python_file
from isr_jax.errors import (
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    Preempted,
    WorkdirError,
)

_SWEEP = flags.DEFINE_string("sweep", None, "A sweep file, optionally with ':<argument>'.")
_CONFIG = flags.DEFINE_string("config", None, "Without --sweep: the config file[:argument].")
_AXES = flags.DEFINE_multi_string("axis", [], "Without --sweep: <setting>=<v1>,<v2>,… (repeat).")
_SET = flags.DEFINE_multi_string("set", [], "<setting>=<value> for every run (repeat).")
_NAME = flags.DEFINE_string("name", "sweep", "Without --sweep: the grid's name.")
_ONLY = flags.DEFINE_string("only", None, "Run only the runs whose name matches this regex.")
_SHARD = flags.DEFINE_string("shard", "0/1", "i/n: run every n-th run starting at the i-th.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the runs and their settings; train nothing.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only collect the records of runs already made.")
_PRIOR = flags.DEFINE_string(
    "prior_records", None,
    "Records of this sweep's runs finished elsewhere (a results.jsonl, or a directory "
    "holding <sweep name>.jsonl, e.g. experiments/results): done runs are not trained again.")
_RETRY_DIVERGED = flags.DEFINE_bool("retry_diverged", False,
                                    "Train again the runs that diverged (their DIVERGED file).")


def parse_value(text: str):
  """A Python literal (``0.1``, ``True``, ``(1, 2)``, ``'x'``) or else the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
  setting, eq, value = text.partition("=")
  if not eq or not setting:
    raise ConfigError(f"--{flag}={text!r}: write <setting>=<value>")
  return setting.strip(), value


def sweep_from_flags() -> Sweep:
  if _SWEEP.value:
    sweep = load_python_file(_SWEEP.value, "get_sweep")
    if not isinstance(sweep, Sweep):
      raise ConfigError(f"{_SWEEP.value}: get_sweep() must return experiments.sweeps.Sweep")
    if _AXES.value or _CONFIG.value:
      raise ConfigError("--axis and --config build a sweep without a file; --sweep names one")
  else:
    if not _CONFIG.value:
      raise ConfigError("give --sweep=<sweep file> or --config=<config file> with --axis")
    axes = []
    for text in _AXES.value:
      setting, values = parse_assignment(text, "axis")
      axes.append(axis(setting.replace(".", "_"), setting=setting,
                       options=[parse_value(v) for v in values.split(",")]))
    sweep = Sweep(_NAME.value, [Grid(_NAME.value, _CONFIG.value, axes)])
  common = dict(parse_assignment(t, "set") for t in _SET.value)
  common = {k: parse_value(v) for k, v in common.items()}
  if common:
    sweep = sweep._replace(grids=[g._replace(settings={**g.settings, **common})
                                  for g in sweep.grids])
  return sweep


def sweep_command() -> str:
  """The command that makes (or resumes) the sweep: these flags, less --shard, --dry_run,
  --collect and --retry_diverged, which say how to run it rather than what it is."""
  parts = ["python -m experiments.sweep"]
  if _SWEEP.value:
    parts.append(f"--sweep={_SWEEP.value}")
  else:
    parts += [f"--config={_CONFIG.value}", f"--name={_NAME.value}"]
    parts += [f"--axis={a}" for a in _AXES.value]
  parts += [f"--set={a}" for a in _SET.value]
  if SEEDS.value is not None:
    parts.append(f"--seeds={','.join(SEEDS.value)}")
  if _ONLY.value:
    parts.append(f"--only={_ONLY.value}")
  parts.append(f"--workdir={WORKDIR.value}")
  return " ".join(parts)


def shard_of(runs: list[Run], shard: str) -> list[Run]:
  m = re.fullmatch(r"(\d+)/(\d+)", shard)
  if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
    raise ConfigError(f"--shard={shard!r}: write i/n with 0 <= i < n")
  i, n = int(m.group(1)), int(m.group(2))
  return runs[i::n]


def prior_records(path: str | None, sweep_name: str) -> list[dict]:
  """The records ``--prior_records`` names; none where a directory lacks this sweep's file."""
  if path is None:
    return []
  if os.path.isdir(path):
    path = os.path.join(path, f"{sweep_name}.jsonl")
    if not os.path.exists(path):
      return []
  try:
    return read_records(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--prior_records={path}: not a readable results.jsonl ({e})") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not WORKDIR.value:
    raise app.UsageError("--workdir: the sweep's directory (one workdir per run inside)")
  logging.set_verbosity(logging.WARNING)
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  sweep_dir = WORKDIR.value
  try:
    only = re.compile(_ONLY.value) if _ONLY.value else None
    sweep = sweep_from_flags()
    seeds = None if SEEDS.value is None else [int(s) for s in SEEDS.value]
    every = expand(sweep, seeds)
    runs = shard_of([r for r in every if only is None or only.search(r.name)], _SHARD.value)
    prior = prior_records(_PRIOR.value, sweep.name)
  except re.error as e:
    sys.exit(f"error: --only={_ONLY.value!r} is not a regular expression: {e}")
  except (ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")
  if _DRY_RUN.value:
    try:
      for run in runs:
        build_config(run)
    except ConfigError as e:
      sys.exit(f"error: {e}")
    for run in runs:
      print(run.name, json.dumps(dict(run.settings), sort_keys=True))
    print(f"{len(runs)} runs")
    return
  if not _COLLECT.value:
    print(f"sweep {sweep.name}: {len(runs)} runs in {sweep_dir}", flush=True)
  try:
    records = execute(sweep_dir, sweep, [] if _COLLECT.value else runs, sweep_command(),
                      every=every, retry_diverged=_RETRY_DIVERGED.value, prior=prior)
  except Preempted as e:
    print(f"stopped: {e}; the same command resumes the sweep", file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # Ctrl-C between runs: nothing in progress to save
    print("stopped: interrupted; the same command resumes the sweep", file=sys.stderr)
    sys.exit(130)
  except (ConfigError, DataNotFoundError, CheckpointError, WorkdirError) as e:
    sys.exit(f"error: {e}")
  done = sum(r["status"] == "done" for r in records)
  print(f"{done}/{len(records)} runs done; records in {os.path.join(sweep_dir, RESULTS_FILE)}")


if __name__ == "__main__":
  app.run(main)
