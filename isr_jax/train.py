"""``train_and_evaluate(config, workdir)``: the one impure loop of the library.

It builds the data, model, objective and round function from a config
(:func:`build_experiment`, pure apart from loading data), then owns rounds,
evaluation, logging, checkpoints, resume and the NaN guard. The round is
compiled once ahead of time and the compiled executable is called every
round, so a round is one compiled call and can never silently recompile.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isr_jax import checkpoint, writers
from isr_jax import workdir as workdir_files
from isr_jax.centralized import cl_round
from isr_jax.config import RESUME_SAFE_SETTINGS, resume_changes, validate
from isr_jax.data import (
    ClientData,
    DatasetInfo,
    dominant_class,
    load_dataset,
    pack_clients,
    partition,
    split_clients,
    split_cloud,
)
from isr_jax.errors import ConfigError, NaNLossError, Preempted
from isr_jax.evaluate import evaluate_classifier
from isr_jax.fl.algorithm import Batch, LocalProblem, bind_problem
from isr_jax.fl.client import auto_parallelism, local_step_flops, resolve_parallelism
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.registry import make_algorithm, personalized_eval_on
from isr_jax.fl.round import FLSpec, RoundFns, fl_round, init_client_states
from isr_jax.hybrid import HybridSpec, hybrid_round
from isr_jax.metric_writer import METRICS_FILE, JsonlWriter, read_metrics
from isr_jax.models import create_model
from isr_jax.models.layers import resolve_conv_impl, xla_compiler_options
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer
from isr_jax.preemption import stop_requests
from isr_jax.progress import Progress
from isr_jax.sharding import (
  CLIENT_AXIS,
  make_mesh,
  pad_clients,
  padded_count,
  put_clients,
  put_replicated,
)
from isr_jax.state import TrainState
from isr_jax.taps import ISRSpec, make_isr_spec

logger = logging.getLogger("isr_jax")


class Experiment(NamedTuple):
  """Everything a run needs, built from its config.

  Attributes:
    state: the initial :class:`TrainState`.
    round_fn: ``jit``-ed ``(state, *data) -> (state, metrics)``, state donated,
      output shardings pinned to the input ones.
    apply: the model's forward pass ``(model_params, x) -> (logits, taps)``.
    round_data: the device arrays ``round_fn`` takes after the state.
    eval_fn: ``jit``-ed ``(model_params, test_data) -> metrics``.
    test_data: the test split packed as one client.
    info: dataset facts.
    isr_spec: the ISR taps and weights (``None`` = ISR off).
    tap_names: every tap the model exposes, in block order.
    client_eval_fn: ``jit``-ed ``(state, *client_eval_data) -> metrics``, the
      personalized evaluation (:mod:`isr_jax.fl.evaluate_clients`), or ``None``.
    client_eval_data: every client's training rows and its own test split.
    fl_spec: the FL round's settings, with ``auto`` client parallelism resolved
      (:func:`isr_jax.fl.client.auto_parallelism`); ``None`` in CL mode.
    problem: the client objective the round optimises
      (:class:`~isr_jax.fl.algorithm.LocalProblem`: ``apply``, ``objective``,
      ``loss`` = Eq. 5's ``L_T``), for measurements that differentiate it
      outside the round (:mod:`isr_jax.diagnostics`); ``None`` only for an
      Experiment built by hand.
  """

  state: TrainState
  round_fn: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  round_data: tuple[ClientData, ...]
  apply: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  eval_fn: Callable[..., dict[str, jax.Array]]
  test_data: ClientData
  info: DatasetInfo
  isr_spec: ISRSpec | None
  tap_names: tuple[str, ...]
  client_eval_fn: Callable[..., dict[str, jax.Array]] | None = None
  client_eval_data: tuple[ClientData, ClientData] = ()
  fl_spec: FLSpec | None = None
  problem: LocalProblem | None = None


def _put_batches(data: ClientData, mesh) -> ClientData:
  """A single packed client with its batch axis split over the devices (for eval)."""
  if data.batch_size % mesh.size:
    return put_replicated(data, mesh)
  sharding = NamedSharding(mesh, P(None, None, CLIENT_AXIS))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
      sharding if a.ndim >= 3 else NamedSharding(mesh, P()), np.asarray(a)), data)


def _pack_fl(config, train, info: DatasetInfo, indices,
             held_out: bool = False) -> tuple[ClientData, ClientData | None]:
  """Partitions ``train[indices]`` over the clients and packs them.

  Segmentation images are partitioned by their dominant class (Dirichlet,
  shards, ...) or by city/sequence (``natural``). ``held_out``: each client's
  partition is split into its own train and test parts (``fl.client_test_fraction``),
  returned as the second element (else ``None``).
  """
  part = config.fl.partition
  y = train.y[indices]
  labels = y if y.ndim == 1 else dominant_class(y, info.ignore_index)
  groups = None if train.groups is None else train.groups[indices]
  clients = partition(
      labels, config.fl.num_clients, part.method, seed=config.seed, alpha=part.dirichlet_alpha,
      shards_per_client=part.shards_per_client, classes_per_client=part.classes_per_client,
      groups=groups,
  )
  if not held_out:
    return pack_clients(train.x, train.y, [indices[c] for c in clients],
                        config.dataset.batch_size), None
  own_train, own_test = split_clients(clients, labels, config.fl.client_test_fraction,
                                      seed=config.seed)
  # A client's test split is small (150 examples on average in the personalized
  # preset): batches of eval_batch_size (500) would be mostly padding, and every
  # client's padding is evaluated; the training batch bounds each one's by B - 1.
  test_batch = min(config.dataset.eval_batch_size, config.dataset.batch_size)
  return (pack_clients(train.x, train.y, [indices[c] for c in own_train],
                       config.dataset.batch_size),
          pack_clients(train.x, train.y, [indices[c] for c in own_test], test_batch,
                       allow_empty=True))


def _create_model(config: ml_collections.ConfigDict, info: DatasetInfo, key: jax.Array,
                  conv_impl: str) -> nnx.Module:
  return create_model(
      config.model.name, num_classes=info.num_classes, input_shape=info.input_shape,
      rngs=nnx.Rngs(params=key), conv_impl=conv_impl, **config.model.options.to_dict())


def load_splits(config: ml_collections.ConfigDict):
  """``(train, test, info)`` of the run's dataset, as the run splits and scales it."""
  ds = config.dataset
  return load_dataset(
      ds.name, data_dir=ds.data_dir, seed=config.seed, test_fraction=ds.test_fraction,
      standardize=ds.standardize,
      image_size=tuple(ds.image_size) if ds.image_size else None, **ds.options.to_dict())


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Loads data and builds model, objective, state and the jitted round."""
  validate(config)
  ds = config.dataset
  train, test, info = load_splits(config)
  key_model, key_adapters, key_run = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  conv_impl = resolve_conv_impl(config.model.conv_impl,
                                resolve_parallelism(config.fl.client_parallelism))
  model = _create_model(config, info, key_model, conv_impl)
  tap_names = tuple(model.tap_names)
  isr = config.isr
  spec = make_isr_spec(
      tap_names, enabled=isr.enabled, taps=tuple(isr.taps), num_taps=isr.num_taps,
      spacing=isr.spacing, placement=isr.placement, alpha=isr.mi_weight, lam=isr.ne_weight,
      ne_normalize=isr.ne_normalize, decouple_adapters=isr.decouple_adapters,
  )
  graphdef, model_params = split_model(model)
  params = init_params(graphdef, model_params, spec, num_classes=info.num_classes,
                       input_shape=info.input_shape, key=key_adapters)
  problem = make_problem(graphdef, spec, ignore_index=info.ignore_index,
                         representation=tap_names[-1])
  mesh = make_mesh(config.fl.num_devices or None)
  parallelism, chunk_size = config.fl.client_parallelism, config.fl.chunk_size
  if config.mode != "cl":
    b = ds.batch_size
    one_batch = Batch(train.x[:b], train.y[:b], np.ones(len(train.y[:b]), bool))
    parallelism, chunk_size = auto_parallelism(
        config.fl.client_parallelism, chunk_size,
        clients=padded_count(config.fl.clients_per_round, mesh) // mesh.size,
        step_flops=lambda: local_step_flops(problem.loss, params, one_batch))
    if config.fl.client_parallelism == "auto":
      logger.info("fl.client_parallelism=auto runs %s%s", parallelism,
                  f" (chunks of {chunk_size})" if parallelism == "chunked" else "")
    chosen_impl = resolve_conv_impl(config.model.conv_impl, parallelism)
    if chosen_impl != conv_impl:  # same parameters (same key), other convolution lowering
      graphdef, _ = split_model(_create_model(config, info, key_model, chosen_impl))
      problem = make_problem(graphdef, spec, ignore_index=info.ignore_index,
                             representation=tap_names[-1])
  test_data = _put_batches(pack_clients(test.x, test.y, [np.arange(len(test.y))],
                                        ds.eval_batch_size), mesh)
  eval_fn = jax.jit(functools.partial(evaluate_classifier, problem.apply,
                                      num_classes=info.num_classes,
                                      ignore_index=info.ignore_index),
                    compiler_options=xla_compiler_options())
  client_eval_fn, client_eval_data = None, ()
  state = TrainState(params=params, opt_state=None, alg_state={}, client_states={},
                     rng=key_run, round=jnp.zeros((), jnp.int32),
                     alpha=jnp.asarray(config.hybrid.mix_weight, jnp.float32))

  fl_spec = None
  if config.mode == "cl":
    optimizer = make_optimizer(config.cl_optimizer, setting="cl_optimizer")
    data = pack_clients(train.x, train.y, [np.arange(len(train.y))], ds.batch_size)
    round_fn = functools.partial(
        cl_round, problem=problem, optimizer=optimizer,
        lr_fn=functools.partial(learning_rate_at, config.cl_optimizer), unroll=config.fl.unroll)
    state = put_replicated(state._replace(opt_state=optimizer.init(params)), mesh)
    round_data = (put_replicated(data, mesh),)
  else:
    algorithm = bind_problem(make_algorithm(config), problem)
    local_opt = make_optimizer(config.client_optimizer, setting="client_optimizer")
    server_opt = algorithm.server_optimizer or make_optimizer(
        config.fl.server_optimizer, setting="fl.server_optimizer")
    fns = RoundFns(algorithm, problem, local_opt,
                   functools.partial(learning_rate_at, config.client_optimizer), server_opt)
    fl_spec = FLSpec(
        clients_per_round=config.fl.clients_per_round, local_epochs=config.fl.local_epochs,
        local_steps=config.fl.local_steps,
        parallelism=parallelism,
        chunk_size=chunk_size, aggregate_adapters=isr.aggregate_adapters,
        unroll=config.fl.unroll, num_clients=config.fl.num_clients, mesh=mesh,
        measure_heterogeneity=config.fl.measure_heterogeneity,
    )
    rows = padded_count(config.fl.num_clients, mesh)
    held_out = personalized_eval_on(config, algorithm)
    if config.mode == "fl":
      clients, own_test = _pack_fl(config, train, info, np.arange(len(train.y)), held_out)
      round_fn = functools.partial(fl_round, fns=fns, spec=fl_spec)
      cloud = None
    else:
      hy = config.hybrid
      cloud_idx, rest = split_cloud(len(train.y), hy.cloud_fraction, seed=config.seed)
      clients, own_test = _pack_fl(config, train, info, rest, held_out)
      cloud = put_replicated(pack_clients(train.x, train.y, [cloud_idx], ds.batch_size), mesh)
      hybrid = HybridSpec(schedule=hy.schedule, beta=hy.beta, alpha_min=hy.mix_weight_min,
                          adaptive_rule=hy.adaptive_rule, cloud_steps=hy.cloud_steps)
      round_fn = functools.partial(hybrid_round, fns=fns, spec=fl_spec, hybrid=hybrid)
    clients = put_clients(pad_clients(clients, rows), mesh)
    round_data = (clients,) if cloud is None else (clients, cloud)
    if own_test is not None:
      client_eval_data = (clients, put_clients(pad_clients(own_test, rows), mesh))
      client_eval_fn = jax.jit(
          functools.partial(evaluate_clients, fns=fns, spec=fl_spec,
                            ignore_index=info.ignore_index),
          compiler_options=xla_compiler_options())
    client_states = jax.device_put(
        init_client_states(algorithm, params, clients, isr.aggregate_adapters),
        NamedSharding(mesh, P(CLIENT_AXIS)))
    state = put_replicated(state._replace(
        opt_state=server_opt.init(params),
        alg_state=algorithm.init_server_state(params, clients)), mesh)
    state = state._replace(client_states=client_states)
  shardings = jax.tree.map(lambda a: a.sharding, state)
  round_fn = jax.jit(round_fn, donate_argnums=0,
                     out_shardings=(shardings, NamedSharding(mesh, P())),
                     compiler_options=xla_compiler_options())
  return Experiment(
      state=state, round_fn=round_fn, round_data=round_data, apply=problem.apply,
      eval_fn=eval_fn, test_data=test_data, info=info, isr_spec=spec, tap_names=tap_names,
      client_eval_fn=client_eval_fn, client_eval_data=client_eval_data,
      fl_spec=fl_spec, problem=problem,
  )


def _check_resume(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Refuses to resume a run under another config; says whether config.json needs writing.

  Only a workdir with checkpoints holds a run to resume; without them a stale
  config.json describes nothing that was kept and is simply replaced.

  Raises:
    ConfigError: a setting outside :data:`RESUME_SAFE_SETTINGS` differs from
      the workdir's config.json (one line listing each, old → new).
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
        f"own config (only {', '.join(sorted(RESUME_SAFE_SETTINGS))} may change) or use "
        "another --workdir")
  return safe_changed


def _finished_run(exp: Experiment, state: TrainState, workdir: str,
                  primary: bool) -> dict[str, Any]:
  """The result of a run that already trained its rounds, read back and not recomputed.

  Nothing in the workdir changes, except that a summary.json lost to a kill
  right after the last checkpoint is rewritten from that round's metrics line.
  """
  summary_path = os.path.join(workdir, workdir_files.SUMMARY_FILE)
  metrics_path = os.path.join(workdir, METRICS_FILE)
  history = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
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
  shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())
                   if k.startswith("test/") and isinstance(v, float))
  logger.info("%s finished round %d already; nothing to do: %s", workdir, done, shown)
  return {"metrics": metrics, "history": history, "state": state, "compile_s": 0.0,
          "experiment": exp, "finished_earlier": True}


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
  record_config = _check_resume(config, workdir)
  report = Progress(config.num_rounds, enabled=config.logging.progress)
  with stop_requests() as stop:
    report.begin("loading %s and building %s (%s mode, ISR %s)", config.dataset.name,
                 config.model.name, config.mode, "on" if config.isr.enabled else "off")
    exp = build_experiment(config)
    report.end("data and model ready")
    manager = checkpoint.checkpoint_manager(workdir, keep=config.keep_checkpoints)
    out = None
    try:
      report.begin("looking for a checkpoint to resume from in %s", workdir)
      restored = checkpoint.restore_latest(manager, exp.state)
      state = exp.state if restored is None else restored
      start = int(state.round)
      if start >= config.num_rounds:
        return _finished_run(exp, state, workdir, primary)
      if restored is not None:
        logger.info("resuming %s from round %d", workdir, start)
      writer = JsonlWriter(workdir, resume_round=start, enabled=primary)
      out = writers.fan_out(writer, workdir, tensorboard=primary and config.logging.tensorboard)

      report.begin("compiling the round")
      t0 = time.perf_counter()
      round_step = exp.round_fn.lower(state, *exp.round_data).compile()
      compile_s = time.perf_counter() - t0
      logger.info("round compiled in %.1fs (%s mode, %s)", compile_s, config.mode,
                  "ISR on" if exp.isr_spec else "ISR off")
      if stop.signum is not None:  # arrived while loading data or compiling
        raise _preempted(stop.signum, start, str(manager.directory))

      metrics: dict[str, float] = {}
      last_saved = start if restored is not None else None
      report.start(start)
      for r in range(start + 1, config.num_rounds + 1):
        t0 = time.perf_counter()
        state, round_metrics = round_step(state, *exp.round_data)
        metrics = {k: float(v) for k, v in jax.device_get(round_metrics).items()}
        metrics["time/round_s"] = time.perf_counter() - t0
        if not math.isfinite(metrics["train/loss"]):
          kept = (f"the last good checkpoint (round {last_saved}) is kept in "
                  f"{manager.directory}" if last_saved else "no checkpoint had been written yet")
          raise NaNLossError(
              f"train/loss became {metrics['train/loss']} in round {r}; training stopped and "
              f"{kept} — lower the learning rate or the ISR weights")
        if r % config.eval_every == 0 or r == config.num_rounds:
          test = jax.device_get(exp.eval_fn(state.params["model"], exp.test_data))
          metrics.update({f"test/{k}": float(v) for k, v in test.items()})
          if exp.client_eval_fn is not None:
            own = jax.device_get(exp.client_eval_fn(state, *exp.client_eval_data))
            metrics.update({f"personal/{k}": float(v) for k, v in own.items()})
        out.write(r, metrics)
        report.round(r)
        stopping = stop.signum is not None and r < config.num_rounds
        if r % config.checkpoint_every == 0 or r == config.num_rounds or stopping:
          if primary and record_config:  # with its first checkpoint the run has gone ahead
            workdir_files.write_atomic(os.path.join(workdir, workdir_files.CONFIG_FILE),
                                       config.to_json_best_effort(indent=2, sort_keys=True))
            record_config = False
          checkpoint.save(manager, r, state)  # written while the next round runs
          last_saved = r
        if stopping:
          checkpoint.wait(manager)
          raise _preempted(stop.signum, r, str(manager.directory))
      checkpoint.wait(manager)
    finally:
      # Also on errors: waits for a save in flight and stops Orbax's threads.
      checkpoint.close(manager, quiet=sys.exc_info()[0] is not None)
      if out is not None:
        out.close()
  if primary:
    workdir_files.write_json(os.path.join(workdir, workdir_files.SUMMARY_FILE),
                             {"round": int(state.round), **metrics})
  history = read_metrics(writer.path) if primary else []
  if primary and config.logging.plots and history:
    _plot(workdir)
  return {"metrics": metrics, "history": history, "state": state, "compile_s": compile_s,
          "experiment": exp, "finished_earlier": False}
