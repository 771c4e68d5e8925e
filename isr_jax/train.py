"""``train_and_evaluate(config, workdir)``: the one impure loop of the library.

It builds the data, model, objective and round function from a config
(:func:`isr_jax.experiment.build_experiment`, pure apart from loading data),
then owns rounds, evaluation, logging, checkpoints, resume and the NaN guard. The round is
compiled once ahead of time and the compiled executable is called every
round, so a round is one compiled call and can never silently recompile.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from isr_jax import checkpoint, writers
from isr_jax import workdir as workdir_files
from isr_jax.client_results import PerClientWriter
from isr_jax.config import RESUME_SAFE_SETTINGS, resume_changes, validate
from isr_jax.errors import ConfigError, NaNLossError, Preempted
from isr_jax.experiment import Experiment, build_experiment
from isr_jax.fl.channel.accountant import epsilon_spent
from isr_jax.fl.placement import METADATA_KEY
from isr_jax.fl.population_setup import (
    commit_checkpoints,
    evaluate_all,
    example_round_inputs,
    open_state_store,
    population_round,
    resumed_placement,
)
from isr_jax.metric_writer import METRICS_FILE, JsonlWriter, read_metrics
from isr_jax.preemption import stop_requests
from isr_jax.progress import Progress, headline
from isr_jax.state import TrainState

logger = logging.getLogger("isr_jax")


def _check_resume(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses to resume a run under another config; says whether config.json needs writing.

  Only a workdir with checkpoints holds a run to resume; without them a stale
  config.json describes nothing that was kept and is simply replaced.

  Raises:
    ConfigError: a setting outside :data:`RESUME_SAFE_SETTINGS` differs from
      the workdir's config.json (one line listing each, old → new). Settings
      the run never reads (another algorithm's ``fl.<name>``) are not compared;
      ``validate`` has already refused values out of range.
  """
  if not checkpoint.saved_steps(workdir):
    return True
  saved = workdir_files.read_json(os.path.join(workdir, workdir_files.CONFIG_FILE))
  if saved is None:  # a workdir from before config.json was kept: nothing to compare
    return True
  unsafe, safe_changed = resume_changes(saved, config)
  if unsafe:
    raise ConfigError(
        f"{workdir} holds a run with other settings ({'; '.join(unsafe)}): resume it with its "
        f"own config (only {', '.join(sorted(RESUME_SAFE_SETTINGS))} and logging.* may "
        "change) or train this config in another workdir")
  return safe_changed


def _round_step(exp: Experiment, state: TrainState, store) -> Callable:
  """The compiled round, ``state -> (state, metrics)``: on the packed clients, or on each
  round's clients gathered from the host (:mod:`isr_jax.fl.population`)."""
  if exp.population is None:
    compiled = exp.round_fn.lower(state, *exp.round_data).compile()
    return lambda s: compiled(s, *exp.round_data)
  runner = population_round(exp.population, exp.round_fn, exp.fl_spec, store, exp.round_data)
  example = example_round_inputs(exp.population, runner, state)
  runner.round_fn = exp.round_fn.lower(*example, *exp.round_data).compile()
  return runner


def _finished_run(exp: Experiment, state: TrainState, workdir: str,
                  primary: bool) -> dict[str, Any]:
  """The result of a run that already trained its rounds, read back and not recomputed.

  Nothing in the workdir changes, except that a summary.json lost to a kill
  right after the last checkpoint is rewritten from that round's metrics line.
  """
  summary_path = os.path.join(workdir, workdir_files.SUMMARY_FILE)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  history = read_metrics(metrics_path) if os.path.isfile(metrics_path) else []
  summary = workdir_files.read_json(summary_path)
  done = int(state.round)
  if summary is None:
    summary = next((dict(r) for r in history if r.get("round") == done), None)
    if summary is not None and primary:
      workdir_files.write_json(summary_path, summary)
  if summary is None:  # neither file has it: evaluate the restored model, write nothing
    test = jax.device_get(exp.eval_fn(state.params["model"], exp.test_data))
    summary = {"round": done, **{f"test/{k}": float(v) for k, v in test.items()}}
  metrics = {k: v for k, v in summary.items() if k != "round"}
  logger.info("%s finished round %d already; reused, not trained again: %s", workdir, done,
              headline(metrics) or "no evaluation recorded")
  return {"metrics": metrics, "history": history, "state": state, "compile_s": 0.0,
          "experiment": exp, "finished_earlier": True}


def _recover_config_file(workdir: str, primary: bool) -> None:
  """Writes a lost config.json back from the config kept with the newest checkpoint.

  So a resume is compared with the config its checkpoints were trained under
  (a changed seed would otherwise resume them silently). Checkpoints saved
  before the config was kept with them leave nothing to recover.
  """
  path = os.path.join(workdir, workdir_files.CONFIG_FILE)
  if os.path.lexists(path):
    return
  found = checkpoint.saved_metadata(workdir, "config")
  if found is None or not isinstance(found[1], dict):
    return
  step, saved = found
  if primary:
    workdir_files.write_json(path, saved)
  logger.warning("%s was missing: recovered from the checkpoint of round %d", path, step)


def _check_data_shape(config: ml_collections.ConfigDict, exp: Experiment, workdir: str) -> None:
  """Refuses data whose examples differ in shape from those the checkpoints were trained on.

  The restore would only find that the state does not match the model.

  Raises:
    ConfigError: the shapes differ (one line naming both and the round).
  """
  found = checkpoint.saved_metadata(workdir, "input_shape")
  if found is None or not isinstance(found[1], list) or \
      tuple(found[1]) == tuple(exp.info.input_shape):
    return
  step, saved = found
  shown = lambda shape: "×".join(str(d) for d in shape)  # noqa: E731
  raise ConfigError(
      f"dataset.name={config.dataset.name!r} gave examples of shape "
      f"{shown(exp.info.input_shape)}, but the checkpoint of round {step} in {workdir} was "
      f"trained on {shown(saved)}: check dataset.data_dir and dataset.image_size, or use "
      "another --workdir")


def divergence_hint(config: ml_collections.ConfigDict) -> str:
  """What a diverged run had on that a user may lower: the step sizes of the optimizers
  the mode uses, the ISR weights when ISR is on, the FL algorithm's own settings."""
  optimizers = {"cl": ("cl_optimizer",), "fl": ("client_optimizer",),
                "hybrid": ("client_optimizer", "cl_optimizer")}[config.mode]
  knobs = []
  for name in optimizers:
    knobs.append(f"{name}.learning_rate={config[name].learning_rate:g}")
    if config[name].get("momentum"):
      knobs.append(f"{name}.momentum={config[name].momentum:g}")
  if config.isr.enabled:
    knobs += [f"isr.mi_weight={config.isr.mi_weight:g}", f"isr.ne_weight={config.isr.ne_weight:g}"]
  algorithm = config.fl.algorithm
  if config.mode != "cl" and algorithm in config.fl and hasattr(config.fl[algorithm], "items"):
    knobs += [f"fl.{algorithm}.{k}={v}" for k, v in sorted(config.fl[algorithm].items())
              if isinstance(v, (int, float)) and not isinstance(v, bool)]
  return "lower one of " + ", ".join(knobs)


def _preempted(signum: int, done: int, directory: str) -> Preempted:
  name = signal.Signals(signum).name
  if not done:
    return Preempted(f"{name} received before round 1 finished; nothing was trained or saved",
                     signum)
  return Preempted(f"{name} received: stopped after round {done}, saved in "
                   f"{os.path.join(directory, str(done))} — run the same command to resume",
                   signum)


def _plot(workdir: str) -> None:
  """``<workdir>/learning_curves.png``; a figure that fails never fails the run."""
  from isr_jax.plotting import plot_workdirs  # matplotlib: ~1 s of import, paid at the end

  path = os.path.join(workdir, "learning_curves.png")
  try:
    panels = plot_workdirs([workdir], path)
  except (ValueError, OSError) as e:
    logger.warning("learning curves not drawn: %s", e)
    return
  logger.info("learning curves (%s): %s", ", ".join(panels), path)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains for ``config.num_rounds`` rounds in ``workdir``, resuming if possible.

  Args:
    config: a config from :func:`isr_jax.config.default_config` (or an
      experiment file built on it).
    workdir: where ``metrics.jsonl``, ``config.json`` and ``checkpoints/`` live;
      a run started again in the same workdir continues from its latest
      intact checkpoint, if its config differs at most in
      :data:`~isr_jax.config.RESUME_SAFE_SETTINGS`. A run that already
      trained ``num_rounds`` rounds is reported from its files, unchanged.

  Returns:
    ``{"metrics": last round's metrics, "history": every record of the
    workdir's metrics.jsonl (earlier, resumed-from runs included), "state":
    final TrainState, "compile_s": round compile time, "experiment": the
    built :class:`Experiment` (data, forward pass, ...), "finished_earlier":
    whether the run had trained its rounds before this call (then nothing was
    compiled or trained and the metrics are read back)}``.

  Raises:
    ConfigError: an invalid setting (one line naming it and what is allowed),
      or a resume whose config differs from the workdir's config.json.
    NaNLossError: the training loss became non-finite; the last good
      checkpoint is kept.
    CheckpointError: no checkpoint in the workdir can be restored.
    WorkdirError: the workdir is a file, read-only or full; what was already
      written is kept. WorkdirBusy (a WorkdirError): another process is
      training in it.
    Preempted: SIGTERM or SIGINT arrived (handled while this function runs,
      from the main thread); the round in progress was finished and saved.
  """
  validate(config)
  workdir_files.prepare(workdir)
  primary = jax.process_index() == 0  # every process trains; one writes files
  # A second run in the same workdir would interleave checkpoints and metrics:
  # it stops at once (WorkdirBusy). A multi-host job's processes share the workdir.
  with workdir_files.exclusive(workdir) if primary else contextlib.nullcontext():
    return _train_in(config, workdir, primary)


def _train_in(config: ml_collections.ConfigDict, workdir: str, primary: bool) -> dict[str, Any]:
  """:func:`train_and_evaluate` once the workdir is usable and this run holds it."""
  checkpoint.prepare_directory(workdir)
  _recover_config_file(workdir, primary)
  record_config = _check_resume(config, workdir)
  report = Progress(config.num_rounds, enabled=config.logging.progress)
  with stop_requests() as stop:
    report.begin("loading %s and building %s (%s mode, ISR %s)", config.dataset.name,
                 config.model.name, config.mode, "on" if config.isr.enabled else "off")
    exp = build_experiment(config, resumed_placement(config, workdir))
    report.end("data and model ready")
    _check_data_shape(config, exp, workdir)
    manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
    out = store = None
    try:
      report.begin("looking for a checkpoint to resume from in %s", workdir)
      restored = checkpoint.restore_latest(manager, exp.state)
      state = exp.state if restored is None else restored
      start = int(state.round)
      if start >= config.num_rounds:
        return _finished_run(exp, state, workdir, primary)
      if exp.population is not None:  # the client rows as of the restored round
        store = open_state_store(exp.population, workdir, config.fl.num_clients, start)
      if restored is not None:
        logger.info("resuming %s from round %d", workdir, start)
      # The console shows progress; every round's metrics only with logging.verbose.
      writer = JsonlWriter(workdir, resume_round=start, enabled=primary,
                           echo=bool(config.logging.get("verbose", False)))
      out = writers.fan_out(writer, workdir, tensorboard=primary and config.logging.tensorboard,
                            config=json.loads(config.to_json_best_effort()))
      per_client = (PerClientWriter(workdir, config.fl.num_clients, resume_round=start,
                                    enabled=primary)
                    if exp.client_eval_fn is not None else None)

      report.begin("compiling the round")
      t0 = time.perf_counter()
      step = _round_step(exp, state, store)
      compile_s = time.perf_counter() - t0
      logger.info("round compiled in %.1fs (%s mode, %s)", compile_s, config.mode,
                  "ISR on" if exp.isr_spec else "ISR off")
      if stop.signum is not None:  # arrived while loading data or compiling
        raise _preempted(stop.signum, start, str(manager.directory))

      # DP's privacy spent so far, host-side: RDP rescales a cached curve, PLD adds the
      # new round to a cached distribution.
      dp_spec = None if exp.fl_spec is None else exp.fl_spec.channel.dp
      metrics: dict[str, float] = {}
      evaluated = ""  # the latest evaluation's headline, for the progress lines
      last_saved = start if restored is not None else None
      report.start(start)
      for r in range(start + 1, config.num_rounds + 1):
        t0 = time.perf_counter()
        state, round_metrics = step(state)
        metrics = {k: float(v) for k, v in jax.device_get(round_metrics).items()}
        metrics["time/round_s"] = time.perf_counter() - t0
        if dp_spec is not None:
          metrics["dp/epsilon"] = epsilon_spent(dp_spec, r)
        if not math.isfinite(metrics["train/loss"]):
          kept = (f"the last good checkpoint (round {last_saved}) is kept in "
                  f"{manager.directory}" if last_saved else "no checkpoint had been written yet")
          raise NaNLossError(
              f"train/loss became {metrics['train/loss']} in round {r}; training stopped and "
              f"{kept} — {divergence_hint(config)}")
        if r % config.eval_every == 0 or r == config.num_rounds:
          test = jax.device_get(exp.eval_fn(state.params["model"], exp.test_data))
          metrics.update({f"test/{k}": float(v) for k, v in test.items()})
          if exp.client_eval_fn is not None:
            own = (jax.device_get(exp.client_eval_fn(state, *exp.client_eval_data))
                   if store is None else
                   evaluate_all(exp.population, exp.client_eval_fn, state, store,
                                config.fl.num_clients))
            per_client.write(r, own.pop("client_correct"), own.pop("client_examples"))
            metrics.update({f"personal/{k}": float(v) for k, v in own.items()})
          evaluated = headline(metrics)
        out.write(r, metrics)
        report.round(r, note=evaluated)
        stopping = stop.signum is not None and r < config.num_rounds
        if r % config.checkpoint_every == 0 or r == config.num_rounds or stopping:
          if primary and record_config:  # with its first checkpoint the run has gone ahead
            workdir_files.write_atomic(os.path.join(workdir, workdir_files.CONFIG_FILE),
                                       config.to_json_best_effort(indent=2, sort_keys=True))
            record_config = False
          # Written while the next round runs, with what a resume is checked against.
          checkpoint.save(manager, r, state, metadata={
              "config": json.loads(config.to_json_best_effort()),
              "input_shape": list(exp.info.input_shape), METADATA_KEY: exp.placement})
          if store is not None:  # rows no finished checkpoint needs may go
            commit_checkpoints(store, checkpoint.saved_steps(workdir), r)
          last_saved = r
        if stopping:
          checkpoint.wait(manager)
          raise _preempted(stop.signum, r, str(manager.directory))
      checkpoint.wait(manager)
      if store is not None:  # the last checkpoint is on disk: older rows may go
        commit_checkpoints(store, checkpoint.saved_steps(workdir), config.num_rounds)
      report.result(headline(metrics))
      late_stop = stop.signum  # arrived during the last round, which finished and was saved
    finally:
      # Also on errors: waits for a save in flight and stops Orbax's threads.
      checkpoint.close(manager, quiet=sys.exc_info()[0] is not None)
      if store is not None:
        store.close()
      if out is not None:
        out.close()
  if primary:
    workdir_files.write_json(os.path.join(workdir, workdir_files.SUMMARY_FILE),
                             {"round": int(state.round), **metrics})
  history = read_metrics(writer.path) if primary else []
  if primary and config.logging.plots and history:
    _plot(workdir)
  if late_stop is not None:  # the run is complete; what called it (a grid) stops here
    raise Preempted(f"{signal.Signals(late_stop).name} received during the last round: the "
                    f"run finished round {int(state.round)} and was saved — run the same "
                    "command to go on", late_stop)
  return {"metrics": metrics, "history": history, "state": state, "compile_s": compile_s,
          "experiment": exp, "finished_earlier": False}
