"""Running a sweep's runs: configs from their files and settings, training, records.

The part of :mod:`experiments.sweep` that other drivers reuse (``make demo``
runs its grid through it); it defines no flags.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import time
from collections.abc import Iterator

import jax
import ml_collections

from experiments import config_files
from experiments.records import (
    DIVERGED_FILE,
    RESULTS_FILE,
    SWEEP_FILE,
    finished_records,
    sweep_records,
    write_records,
)
from experiments.reporting import GridProgress, train_unless_diverged, write_csv
from experiments.sweeps import Run, Sweep
from isr_jax.config import validate
from isr_jax.config_names import no_setting_hint
from isr_jax.errors import ConfigError, WorkdirBusy
from isr_jax.settings_catalog import rejection
from isr_jax.workdir import read_json, write_atomic


def load_python_file(spec: str, function: str):
  """``<path>[:<argument>]`` -> ``module.<function>(argument)``, with one-line ConfigErrors
  (:func:`experiments.config_files.load_python_file`)."""
  return config_files.load_python_file(spec, function)


def build_config(run: Run) -> ml_collections.ConfigDict:
  """The run's config: its file's, with the run's settings and seed written in, validated."""
  config = load_python_file(run.config, "get_config")
  for setting, value in {**run.settings, "seed": run.seed}.items():
    *path, leaf = setting.split(".")
    node = config
    try:
      for part in path:
        node = node[part]
      if leaf not in node:
        raise KeyError(leaf)
      node[leaf] = value
    except (KeyError, AttributeError):
      raise ConfigError(f"run {run.name}: the config has no setting {setting!r}"
                        f"{no_setting_hint(config, setting)}") from None
    except TypeError as e:  # ml_collections refuses a value of another type
      said = rejection(config, setting, value)  # the checks' own words, where they have some
      raise ConfigError(f"run {run.name}: {said or f'{setting}={value!r}: {e}'}") from None
  validate(config)
  return config


@contextlib.contextmanager
def _sweep_lock(sweep_dir: str) -> Iterator[None]:
  """Serialises the processes of one sweep while they read and rewrite sweep.json."""
  os.makedirs(sweep_dir, exist_ok=True)
  fd = os.open(os.path.join(sweep_dir, ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a rewrite takes milliseconds
    yield
  finally:
    os.close(fd)


def _plain(run: Run) -> dict:
  return json.loads(json.dumps(run._asdict()))  # tuples as lists, as sweep.json holds them


def write_spec(sweep_dir: str, sweep: Sweep, runs: list[Run], command: str) -> None:
  """Adds ``runs`` to ``<sweep_dir>/sweep.json`` (the sweep's name, report kind, command, runs).

  Runs already listed are kept, so processes started with other ``--seeds`` or
  ``--only`` add to the sweep rather than hide each other's runs.

  Raises:
    ConfigError: the directory holds another sweep, or a run of the same name
      with other settings.
  """
  path = os.path.join(sweep_dir, SWEEP_FILE)
  with _sweep_lock(sweep_dir):
    old = read_json(path) or {"name": sweep.name, "runs": []}
    if old["name"] != sweep.name:
      raise ConfigError(f"{sweep_dir} holds the sweep {old['name']!r}, not {sweep.name!r}: "
                        "use another --workdir")
    listed = {r["name"]: r for r in old["runs"]}
    for run in map(_plain, runs):
      if run["name"] in listed and listed[run["name"]] != run:
        raise ConfigError(f"{sweep_dir}: its run {run['name']} has other settings "
                          f"({listed[run['name']]['settings']}): use another --workdir")
      listed[run["name"]] = run
    spec = {"name": sweep.name, "report": sweep.report, "command": command,
            "runs": list(listed.values())}
    write_atomic(path, json.dumps(spec, indent=1) + "\n")


def machine_info() -> dict:
  """What a run ran on, kept beside it (``machine.json``) for the tables' provenance."""
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                 cpu)
  except OSError:
    pass
  return {"device": cpu if device.platform == "cpu" else device.device_kind,
          "platform": device.platform, "cores": os.cpu_count(), "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def collect(sweep_dir: str, prior: list[dict] = ()) -> list[dict]:
  """Writes ``results.jsonl`` and ``results.csv`` from the runs' workdirs (and the
  ``prior`` records of runs finished elsewhere); returns the records."""
  records = sweep_records(sweep_dir, prior)
  write_records(records, os.path.join(sweep_dir, RESULTS_FILE))
  rows = []
  for r in records:
    row = {"name": r["name"], **r["labels"], "seed": r["seed"], "status": r["status"],
           "round": r.get("round", 0)}
    row.update({k: v for k, v in r.get("final", {}).items()
                if k.startswith(("test/", "personal/accuracy_mean", "train/mi"))})
    rows.append(row)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  write_csv([{c: row.get(c, "") for c in columns} for row in rows],
            os.path.join(sweep_dir, "results.csv"))
  return records


def train_runs(runs: list[Run], configs: list, sweep_dir: str, *,
               retry_diverged: bool = False) -> None:
  """Trains (or resumes, or reads back) each run in turn, one line per run with the
  grid's ETA (:class:`~experiments.reporting.GridProgress`).

  A run another process is training is skipped; so is one that diverged before
  (its DIVERGED file), unless ``retry_diverged``.
  """
  grid = GridProgress(len(runs))
  for run, config in zip(runs, configs, strict=True):
    workdir = os.path.join(sweep_dir, run.name)
    diverged = os.path.join(workdir, DIVERGED_FILE)
    grid.start(run.name)  # the line stays open while the run trains
    if os.path.exists(diverged) and not retry_diverged:
      grid.skip("diverged before; skipped (--retry_diverged trains it again)")
      continue
    try:
      out = train_unless_diverged(config, workdir, "")
    except WorkdirBusy:  # another process of this sweep has it
      grid.skip("training in another process; skipped")
      continue
    if out is None:
      write_atomic(diverged, "train/loss became non-finite\n")
      continue
    with contextlib.suppress(FileNotFoundError):
      os.remove(diverged)
    if not out["finished_earlier"]:
      write_atomic(os.path.join(workdir, "machine.json"), json.dumps(machine_info()) + "\n")
    grid.finish(out)


def execute(sweep_dir: str, sweep: Sweep, runs: list[Run], command: str, *,
            every: list[Run] | None = None, retry_diverged: bool = False,
            prior: list[dict] = ()) -> list[dict]:
  """Builds and checks every run's config, lists ``every`` run in sweep.json, trains
  ``runs`` and collects the records of all of them.

  A run that ``prior`` (records collected elsewhere: another machine, an earlier
  session's committed ``experiments/results/<sweep>.jsonl``) holds as done, with
  the same seed and settings, is not trained again; its record joins the others.

  Raises:
    ConfigError, DataNotFoundError, CheckpointError, WorkdirError: one line each,
      for the caller to print; a wrong setting is found before anything trains.
    Preempted: SIGTERM/SIGINT; the run in progress saved its round.
  """
  configs = [build_config(r) for r in runs]
  write_spec(sweep_dir, sweep, runs if every is None else every, command)
  finished = finished_records(prior, map(_plain, runs))
  if finished:
    print(f"{len(finished)} runs already done in the prior records; not trained again",
          flush=True)
  todo = [(r, c) for r, c in zip(runs, configs, strict=True) if r.name not in finished]
  train_runs([r for r, _ in todo], [c for _, c in todo], sweep_dir,
             retry_diverged=retry_diverged)
  return collect(sweep_dir, prior)
