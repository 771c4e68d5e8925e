"""``build_experiment(config)``: the data, model, objective and round function of a run.

Pure apart from loading the data: it validates nothing that
:func:`isr_jax.config.validate` has not, packs the clients (and their held-out
splits for personalized evaluation), builds the model and the ISR objective,
picks the client map and the convolution lowering for the backend, and returns
the jitted round with the initial state placed on the mesh.
:func:`isr_jax.train.train_and_evaluate` runs it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isr_jax.centralized import cl_round
from isr_jax.config import validate
from isr_jax.data import (
  ClientData,
  DatasetInfo,
  dominant_class,
  load_dataset,
  pack_clients,
  partition,
  ragged_clients,
  split_clients,
  split_cloud,
)
from isr_jax.errors import ConfigError
from isr_jax.evaluate import evaluate_classifier
from isr_jax.fl.algorithm import Batch, LocalProblem
from isr_jax.fl.channel.spec import channel_spec, check_algorithm
from isr_jax.fl.client import auto_parallelism, local_step_flops, resolve_parallelism
from isr_jax.fl.evaluate_clients import evaluate_clients
from isr_jax.fl.placement import settings as population_settings
from isr_jax.fl.population import initial_rows, server_init_data
from isr_jax.fl.population_setup import (
  PopulationSetup,
  choose_placement,
  dense_layout_bytes,
  put_rows,
  state_row_template,
)
from isr_jax.fl.registry import is_personalized, make_algorithm, personalized_eval_on
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.hybrid import HybridSpec, hybrid_round
from isr_jax.models import create_model
from isr_jax.nn.compiler import xla_compiler_options
from isr_jax.nn.lowering import resolve_conv_impl
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer
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
    population: the clients kept on the host (``fl.population.placement`` host
      or file: :mod:`isr_jax.fl.population_setup`); ``None`` when they are packed
      on the devices. With it, ``round_fn`` takes the round's gathered clients
      (:class:`~isr_jax.fl.selection.ClientRows`) and ``round_data`` holds only
      the hybrid cloud's data.
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
  population: PopulationSetup | None = None

  @property
  def placement(self) -> str:
    """Where the client population lives: ``device``, ``host`` or ``file``."""
    return "device" if self.population is None else self.population.placement


def _put_batches(data: ClientData, mesh) -> ClientData:
  """A single packed client with its batch axis split over the devices (for eval)."""
  if data.batch_size % mesh.size:
    return put_replicated(data, mesh)
  sharding = NamedSharding(mesh, P(None, None, CLIENT_AXIS))
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
      sharding if a.ndim >= 3 else NamedSharding(mesh, P()), np.asarray(a)), data)


def _partition_fl(config, train, info: DatasetInfo, indices,
                  held_out: bool = False) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
  """Partitions ``train[indices]`` over the clients: each client's example indices.

  Segmentation images are partitioned by their dominant class (Dirichlet,
  shards, ...) or by city/sequence (``natural``). ``held_out``: each client's
  partition is split into its own train and test parts (``fl.client_test_fraction``),
  the test parts returned second (else ``None``).
  """
  part = config.fl.partition
  y = train.y[indices]
  labels = y if y.ndim == 1 else dominant_class(y, info.ignore_index)
  groups = None if train.groups is None else train.groups[indices]
  clients = partition(
      labels, config.fl.num_clients, part.method, seed=config.seed,
      concentration=part.dirichlet_alpha, shards_per_client=part.shards_per_client,
      classes_per_client=part.classes_per_client, groups=groups,
  )
  if not held_out:
    return [indices[c] for c in clients], None
  own_train, own_test = split_clients(clients, labels, config.fl.client_test_fraction,
                                      seed=config.seed)
  if not any(len(t) for t in own_test):  # else the personal/ metrics average over no client
    sizes = [len(c) for c in clients]
    raise ConfigError(
        f"fl.client_test_fraction={config.fl.client_test_fraction} leaves every client's own "
        f"test split empty (clients hold {min(sizes)}-{max(sizes)} examples): raise it, use "
        "fewer clients, or set fl.personalized_eval='off'")
  return [indices[c] for c in own_train], [indices[c] for c in own_test]


def _test_batch(config) -> int:
  """A client's held-out split's batch (150 examples on average in the personalized
  preset): batches of eval_batch_size (500) would be mostly padding, and every
  client's padding is evaluated; the training batch bounds each one's by B - 1."""
  return min(config.dataset.eval_batch_size, config.dataset.batch_size)


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


def build_experiment(config: ml_collections.ConfigDict,
                     placement_override: str | None = None) -> Experiment:
  """Loads data and builds model, objective, state and the jitted round.

  ``placement_override``: where the client population lives (``device``, ``host``,
  ``file``) instead of what ``fl.population`` chooses — a resumed run's
  checkpoints decide it (:func:`isr_jax.fl.placement.placement_for_resume`).
  """
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
      spacing=isr.spacing, placement=isr.placement, mi_weight=isr.mi_weight,
      ne_weight=isr.ne_weight, ne_normalize=isr.ne_normalize,
      decouple_adapters=isr.decouple_adapters,
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
  population = round_state = None  # the clients held on the host, and the round's state
  state = TrainState(params=params, opt_state=None, alg_state={}, client_states={},
                     rng=key_run, round=jnp.zeros((), jnp.int32),
                     mix_weight=jnp.asarray(config.hybrid.mix_weight, jnp.float32))

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
    algorithm = make_algorithm(config, problem)
    channel = channel_spec(config, info.num_classes)
    check_algorithm(channel, algorithm.name, algorithm.mean_messages)
    fl_spec = FLSpec(
        clients_per_round=config.fl.clients_per_round, local_epochs=config.fl.local_epochs,
        local_steps=config.fl.local_steps,
        parallelism=parallelism,
        chunk_size=chunk_size, aggregate_adapters=isr.aggregate_adapters,
        unroll=config.fl.unroll, num_clients=config.fl.num_clients, mesh=mesh,
        measure_heterogeneity=config.fl.measure_heterogeneity, channel=channel,
    )
    federated = make_round(
        algorithm, problem, fl_spec,
        local_optimizer=make_optimizer(config.client_optimizer, setting="client_optimizer"),
        local_lr=functools.partial(learning_rate_at, config.client_optimizer),
        server_optimizer=make_optimizer(config.fl.server_optimizer,
                                        setting="fl.server_optimizer"))
    fns = federated.fns
    rows = padded_count(config.fl.num_clients, mesh)
    held_out = personalized_eval_on(config, algorithm)
    if not held_out and is_personalized(algorithm):
      logger.warning("fl.personalized_eval=off with %s, a personalized algorithm: only the "
                     "global model is evaluated, not the personal models it trains",
                     config.fl.algorithm)
    if config.mode == "fl":
      client_idx, test_idx = _partition_fl(config, train, info, np.arange(len(train.y)),
                                           held_out)
      round_fn = federated.step
      cloud = None
    else:
      hy = config.hybrid
      cloud_idx, rest = split_cloud(len(train.y), hy.cloud_fraction, seed=config.seed)
      client_idx, test_idx = _partition_fl(config, train, info, rest, held_out)
      cloud = put_replicated(pack_clients(train.x, train.y, [cloud_idx], ds.batch_size), mesh)
      hybrid = HybridSpec(schedule=hy.schedule, beta=hy.beta, mix_weight_min=hy.mix_weight_min,
                          adaptive_rule=hy.adaptive_rule, cloud_steps=hy.cloud_steps)
      round_fn = functools.partial(hybrid_round, fns=fns, spec=fl_spec, hybrid=hybrid)
    own_test_eval = test_idx is not None
    if own_test_eval:
      client_eval_fn = jax.jit(
          functools.partial(evaluate_clients, fns=fns, spec=fl_spec,
                            ignore_index=info.ignore_index),
          compiler_options=xla_compiler_options())
    pop_settings = population_settings(config)
    template = state_row_template(federated, params, train.x, train.y,
                                  next(p for p in client_idx if len(p)), ds.batch_size)
    dense = dense_layout_bytes(train.x, train.y, client_idx, ds.batch_size) + (
        dense_layout_bytes(train.x, train.y, test_idx, _test_batch(config)) if own_test_eval
        else 0)
    placement = (placement_override or
                 choose_placement(pop_settings, dense_bytes=dense, template=template,
                                  num_clients=config.fl.num_clients))
    if placement == "device":
      clients = put_clients(pad_clients(
          pack_clients(train.x, train.y, client_idx, ds.batch_size), rows), mesh)
      round_data = (clients,) if cloud is None else (clients, cloud)
      if own_test_eval:
        own_test = pack_clients(train.x, train.y, test_idx, _test_batch(config),
                                allow_empty=True)
        client_eval_data = (clients, put_clients(pad_clients(own_test, rows), mesh))
      fresh = federated.init(params, clients, key_run, mix_weight=config.hybrid.mix_weight)
      state = put_replicated(fresh._replace(client_states={}), mesh)._replace(
          client_states=jax.device_put(fresh.client_states, NamedSharding(mesh, P(CLIENT_AXIS))))
    else:
      logger.info("fl.population.placement=%s: the %d clients stay on the host (%s of data and "
                  "state packed densely), each round's clients are gathered", placement,
                  config.fl.num_clients, f"{dense / 2**30:.2f} GiB")
      train_store = ragged_clients(train.x, train.y, client_idx, ds.batch_size)
      test_store = (ragged_clients(train.x, train.y, test_idx, _test_batch(config),
                                   allow_empty=True) if own_test_eval else None)
      population = PopulationSetup(
          placement, pop_settings, train_store, test_store,
          initial_rows(federated, params, train_store), template,
          functools.partial(put_rows, mesh=mesh), mesh.size)
      round_data = () if cloud is None else (cloud,)
      fresh = federated.init(params, server_init_data(train_store), key_run,
                             mix_weight=config.hybrid.mix_weight)
      state = put_replicated(fresh._replace(client_states={}), mesh)
      # The round returns the state with the round's client rows, split over clients.
      k = padded_count(config.fl.clients_per_round, mesh)
      round_state = state._replace(client_states=population.put(
          jax.tree.map(lambda s: np.zeros((k, *s.shape), s.dtype), template)))
  shardings = jax.tree.map(lambda a: a.sharding, state if round_state is None else round_state)
  round_fn = jax.jit(round_fn, donate_argnums=0,
                     out_shardings=(shardings, NamedSharding(mesh, P())),
                     compiler_options=xla_compiler_options())
  return Experiment(
      state=state, round_fn=round_fn, round_data=round_data, apply=problem.apply,
      eval_fn=eval_fn, test_data=test_data, info=info, isr_spec=spec, tap_names=tap_names,
      client_eval_fn=client_eval_fn, client_eval_data=client_eval_data,
      fl_spec=fl_spec, problem=problem, population=population,
  )
