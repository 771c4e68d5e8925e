"""A finished (or unfinished) run's workdir as one compact record, and a sweep's records.

A record is what every table and figure of experiments/RESULTS.md is computed
from: the run's labels and seed, its final metrics, the best test accuracy, the
curve of the evaluated rounds and anything a measurement wrote beside it
(``flatness.json``), and for a personalized run each client's own accuracy at
the last evaluation (``personal.jsonl``). Records are one JSON line each in a sweep's
``results.jsonl``; committed copies under ``experiments/results/`` let
``experiments.report`` rebuild RESULTS.md without the workdirs.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping

from isr_jax.client_results import read_per_client
from isr_jax.metric_writer import METRICS_FILE, read_metrics
from isr_jax.workdir import CONFIG_FILE, read_json, write_atomic

RESULTS_FILE = "results.jsonl"
SWEEP_FILE = "sweep.json"
DIVERGED_FILE = "DIVERGED"
# Measurements other commands add to a run's workdir, merged into its record.
EXTRA_FILES = ("machine.json", "flatness.json", "isr_diagnostics.json")
# A record's "late" metrics average the last LATE_EVALUATIONS evaluated rounds: a
# final-round accuracy that oscillates (FedAvg under two classes per client moves
# by 5-15 points between evaluations) is then compared on what it settles around.
LATE_EVALUATIONS = 3
# Metrics kept per evaluated round (the curves of the figures); prefixes.
CURVE_PREFIXES = ("test/accuracy", "test/loss", "personal/accuracy", "train/mi",
                  "train/ce", "fl/client_drift")


def run_record(workdir: str, run: Mapping) -> dict:
  """The record of the run ``run`` (a :class:`experiments.sweeps.Run` as a dict) in ``workdir``.

  ``status`` is ``done`` (trained its ``num_rounds``), ``diverged`` (stopped on a
  non-finite loss; the sweep left a DIVERGED file), ``partial`` (stopped
  before the end) or ``missing`` (never started).
  """
  record = {"name": run["name"], "labels": dict(run["labels"]), "seed": run["seed"],
            "settings": dict(run["settings"])}
  metrics_path = os.path.join(workdir, METRICS_FILE)
  # A run another process has just started has a workdir but no metrics yet.
  history = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
  config = read_json(os.path.join(workdir, CONFIG_FILE)) if history else None
  diverged = os.path.join(workdir, DIVERGED_FILE)
  if os.path.exists(diverged):
    with open(diverged) as f:
      record.update(status="diverged", reason=f.read().strip())
  if not history:
    record.setdefault("status", "missing")
    return record
  num_rounds = (config or {}).get("num_rounds")
  last = history[-1]
  record.setdefault("status", "done" if num_rounds and last["round"] >= num_rounds
                    else "partial")
  record["round"] = last["round"]
  evaluated = [r for r in history if "test/accuracy" in r]
  final = dict(evaluated[-1]) if evaluated else {}
  final.update({k: v for k, v in last.items() if k.startswith(("train/", "fl/", "comm/"))})
  record["final"] = {k: v for k, v in final.items() if k != "round"}
  if evaluated:
    record["best"] = {"test/accuracy": max(r["test/accuracy"] for r in evaluated)}
    late = evaluated[-LATE_EVALUATIONS:]
    record["late"] = {k: statistics.fmean(r[k] for r in late)
                      for k in ("test/accuracy", "personal/accuracy_mean")
                      if all(isinstance(r.get(k), (int, float)) for r in late)}
    personal = [r["personal/accuracy_mean"] for r in evaluated if "personal/accuracy_mean" in r]
    if personal:
      record["best"]["personal/accuracy_mean"] = max(personal)
  record["curve"] = [{k: v for k, v in r.items() if k == "round" or k.startswith(CURVE_PREFIXES)}
                     for r in evaluated]
  times = [r["time/round_s"] for r in history if "time/round_s" in r]
  if times:
    record["round_s"] = statistics.median(times)
  clients = read_per_client(workdir)
  if clients:  # the last evaluation's, as "final" has it: one value per client
    record["per_client"] = clients[-1]
  for name in EXTRA_FILES:
    extra = read_json(os.path.join(workdir, name))
    if extra is not None:
      record[name.removesuffix(".json")] = extra
  return record


def sweep_records(sweep_dir: str, prior: Iterable[dict] = ()) -> list[dict]:
  """Records of every run listed in ``<sweep_dir>/sweep.json``, in its order.

  ``prior`` records (a committed ``results.jsonl`` of the same sweep) stand in
  for runs whose workdir has not finished them: a grid spans machines and
  sessions through its committed records, not only through its workdirs.
  """
  spec = read_json(os.path.join(sweep_dir, SWEEP_FILE))
  if spec is None:
    raise FileNotFoundError(f"{os.path.join(sweep_dir, SWEEP_FILE)} not found: not a sweep "
                            "workdir (run experiments.sweep there first)")
  shared = {"sweep": spec["name"], "report": spec.get("report", ""),
            "command": spec.get("command", "")}
  finished = finished_records(prior, spec["runs"])
  records = []
  for run in spec["runs"]:
    record = {**shared, **run_record(os.path.join(sweep_dir, run["name"]), run)}
    if record["status"] != "done" and run["name"] in finished:
      record = {**finished[run["name"]], **shared}
    records.append(record)
  return records


def finished_records(records: Iterable[dict], runs: Iterable[Mapping]) -> dict[str, dict]:
  """The ``done`` records among ``records`` of the ``runs`` they describe, by run name.

  A record counts only where its run is the same run: same name, seed and
  settings (a sweep file edited since keeps nothing of the runs it changed).
  """
  wanted = {r["name"]: r for r in runs}
  kept = {}
  for record in records:
    run = wanted.get(record.get("name"))
    if (run is not None and record.get("status") == "done" and record.get("seed") == run["seed"]
        and record.get("settings") == dict(run["settings"])):
      kept[record["name"]] = record
  return kept


def write_records(records: Iterable[dict], path: str) -> None:
  """One JSON line per record, replaced all at once (several processes of a sweep collect)."""
  write_atomic(path, "".join(json.dumps(_finite(r), sort_keys=True) + "\n" for r in records))


def read_records(path: str) -> list[dict]:
  """The records of a ``results.jsonl``, or of a sweep workdir (collected afresh; the
  runs its last ``results.jsonl`` took from prior records are kept)."""
  if os.path.isdir(path):
    last = os.path.join(path, RESULTS_FILE)
    return sweep_records(path, read_records(last) if os.path.exists(last) else ())
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finite(value):
  """JSON has no NaN: non-finite floats become None."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  return value
