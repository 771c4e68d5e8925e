"""Small, fast building blocks shared by the round/hybrid/identity tests."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from isr_jax.data import load_dataset, pack_clients
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.algorithms.fedaims import fedaims
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.registry import make_algorithm
from isr_jax.fl.round import make_round
from isr_jax.fl.spec import FLSpec
from isr_jax.models import create_model
from isr_jax.nn.compiler import xla_compiler_options
from isr_jax.objective import init_params, make_problem, split_model
from isr_jax.optim import learning_rate_at, make_optimizer
from isr_jax.taps import make_isr_spec

UNEVEN_SIZES = (7, 30, 19, 45, 12, 26)


@functools.cache
def digits():
  train, test, info = load_dataset("digits", seed=0)
  return train, test, info


def uneven_clients(sizes=UNEVEN_SIZES, batch_size=8):
  """Digits split into clients of the given (uneven) sizes, as device arrays."""
  train, _, _ = digits()
  bounds = np.cumsum((0,) + tuple(sizes))
  parts = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, batch_size))


def sgd_config(lr=0.1, momentum=0.0, name="sgd"):
  return ml_collections.ConfigDict(dict(name=name, learning_rate=lr, momentum=momentum))


def small_setup(*, isr=True, algorithm=None, local=None, server=None, data=None,
                aggregate_adapters=True, mix_weight=0.5, model="lenet5", seed=0):
  """``(state, fns, spec)`` for a LeNet-5 on digits with two ISR taps.

  ``algorithm``: an :class:`FLAlgorithm`, a config (``fl.algorithm`` built with
  this problem), or ``problem -> FLAlgorithm`` (FedAIMS, sized from the model).
  """
  _, _, info = digits()
  net = create_model(model, num_classes=10, input_shape=info.input_shape,
                     rngs=nnx.Rngs(seed))
  spec = make_isr_spec(net.tap_names, enabled=isr, num_taps=2, spacing=2, mi_weight=0.5,
                       ne_weight=0.05)
  graphdef, model_params = split_model(net)
  params = init_params(graphdef, model_params, spec, num_classes=10,
                       input_shape=info.input_shape, key=jax.random.PRNGKey(seed + 1))
  problem = make_problem(graphdef, spec)
  if isinstance(algorithm, ml_collections.ConfigDict):
    algorithm = make_algorithm(algorithm, problem)
  elif callable(algorithm):
    algorithm = algorithm(problem=problem)
  local = local or sgd_config()
  data = uneven_clients() if data is None else data
  built = make_round(
      algorithm or fedavg(), problem,
      FLSpec(clients_per_round=1, aggregate_adapters=aggregate_adapters),
      local_optimizer=make_optimizer(local), local_lr=functools.partial(learning_rate_at, local),
      server_optimizer=make_optimizer(server or sgd_config(lr=1.0)))
  state = built.init(params, data, jax.random.PRNGKey(seed + 2), mix_weight=mix_weight)
  return state, built.fns, spec


def fedaims_with(**settings):
  """FedAIMS with ``settings``, built when :func:`small_setup` hands it the problem."""
  return functools.partial(fedaims, **settings)


def plain_sgd_client(params, loss, x, y, idx, valid, lr):
  """Reference local training: a Python loop of plain optax SGD steps."""
  opt = optax.sgd(lr)
  opt_state = opt.init(params)
  grad = jax.jit(jax.grad(lambda p, b: loss(p, b)[0]))
  steps = 0
  for t in range(idx.shape[0]):
    if not bool(valid[t].any()):
      continue
    batch = Batch(x[idx[t]], y[idx[t]], valid[t])
    updates, opt_state = opt.update(grad(params, batch), opt_state, params)
    params = optax.apply_updates(params, updates)
    steps += 1
  return params, steps


def as_float64(tree):
  """``tree`` with its floating leaves in float64 (inside ``jax.enable_x64(True)``)."""
  return jax.tree.map(
      lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def assert_trees_close(a, b, atol=1e-5, rtol=1e-5):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=atol, rtol=rtol), a, b)


@functools.cache
def _optimizer_step(optimizer):
  return jax.jit(optimizer.update)


def reference_trainer(cdata, key, lr, fns, spec, batch_size=None):
  """A :class:`LocalTrainer` whose ``train`` is a plain Python loop of optimizer steps.

  Mirrors the engine's schedule (same keys, same batches) but none of its
  scan or step masking (freezing and projection done by hand): the reference for
  ``local_update`` algorithms.
  ``grad_fn`` is jitted per call unless it says it is already (``grad_fn.compiled``).
  """
  from isr_jax.fl.algorithm import LocalTrainer
  from isr_jax.fl.client import batch_schedule
  from isr_jax.optim import with_learning_rate

  x = cdata.x.reshape((-1,) + cdata.x.shape[2:])
  y = cdata.y.reshape((-1,) + cdata.y.shape[2:])
  step = _optimizer_step(fns.local_optimizer)
  batch_size = batch_size or cdata.mask.shape[-1]

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0, project=None):
    k = key if stream == 0 else jax.random.fold_in(key, 7919 + stream)
    idx, valid = batch_schedule(
        k, cdata.mask.reshape(-1), batch_size,
        epochs=spec.local_epochs if epochs is None else epochs,
        steps=spec.local_steps if epochs is None else 0)
    grad = grad_fn if getattr(grad_fn, "compiled", False) else jax.jit(grad_fn)
    params, opt_state = start, with_learning_rate(fns.local_optimizer.init(start), lr)
    steps, aux_sum = 0, None
    for t in range(idx.shape[0]):
      if not bool(valid[t].any()):
        continue
      g, aux = grad(params, Batch(x[idx[t]], y[idx[t]], valid[t]), jax.random.fold_in(k, t))
      updates, opt_state = step(g, opt_state, params)
      if trainable is not None:
        updates = jax.tree_util.tree_map_with_path(
            lambda path, u: u if trainable(path) else jnp.zeros_like(u), updates)
      params = optax.apply_updates(params, updates)
      if project is not None:
        params = project(params)
      aux_sum = aux if aux_sum is None else jax.tree.map(jnp.add, aux_sum, aux)
      steps += 1
    return params, aux_sum, jnp.int32(steps)

  return LocalTrainer(train=train, problem=fns.problem, data=cdata, key=key)


def reference_round(state, data, fns, spec):
  """One round written as a plain per-client loop over the algorithm's own functions.

  Independent of the engine's vmap, scan, step masking, and gather/scatter of
  client state (personal leaves and ``plan_round`` included): what the vmapped
  round must reproduce for every algorithm.
  """
  from isr_jax.fl.algorithm import ServerBroadcast
  from isr_jax.fl.personal import merge, personal_predicate, select, zero_personal
  from isr_jax.fl.selection import round_keys, sample_clients

  alg = fns.algorithm
  personal = personal_predicate(alg.personal, spec.aggregate_adapters)
  k_sample, k_clients, _ = round_keys(state)
  sampled = np.asarray(sample_clients(k_sample, data.num_clients, spec.clients_per_round))
  lr = fns.local_lr(state.round)
  grad = jax.jit(lambda p, c, b, k: alg.client_grad(p, c, b, fns.problem, k))
  plans = None
  if alg.plan_round is not None:
    gathered = jax.tree.map(lambda a: a[sampled], state.client_states["alg"])
    plans = alg.plan_round(state.alg_state, gathered, jnp.asarray(sampled))
  messages, new_states, sizes = [], [], []
  for i, c in enumerate(sampled):
    row = lambda tree, c=c: jax.tree.map(lambda a: a[c], tree)
    cdata, cstate = row(data), row(state.client_states)
    start = merge(state.params, cstate.get("personal", {}))
    plan = None if plans is None else jax.tree.map(lambda a, i=i: a[i], plans)
    broadcast = ServerBroadcast(start, state.alg_state, state.round, lr, plan)
    ctx = alg.client_init(broadcast, cstate["alg"], cdata)
    key = jax.random.fold_in(k_clients, int(c))
    trainer = reference_trainer(cdata, key, lr, fns, spec, data.batch_size)
    if alg.local_update is None:
      grad_fn = lambda p, b, k, ctx=ctx: grad(p, ctx, b, k)
      grad_fn.compiled = True  # one compilation for every client
      params, _, steps = trainer.train(start, grad_fn)
    else:
      params, ctx, _, steps = alg.local_update(start, ctx, trainer)
    message, new_alg_state = alg.client_final(broadcast, ctx, params, steps, cstate["alg"])
    messages.append(message)
    new = {**cstate, "alg": new_alg_state}
    if "personal" in cstate:
      new["personal"] = select(params, personal)
    new_states.append(new)
    sizes.append(float(cdata.num_examples))
  stacked = zero_personal(jax.tree.map(lambda *m: jnp.stack(m), *messages), personal)
  weights = jnp.asarray(sizes) / sum(sizes)
  pseudo_grad, alg_state, *_ = alg.server_update(state.params, state.alg_state, stacked,
                                                 weights)
  pseudo_grad = zero_personal(pseudo_grad, personal)
  updates, opt_state = fns.server_optimizer.update(pseudo_grad, state.opt_state, state.params)
  client_states = state.client_states
  for c, new in zip(sampled, new_states, strict=True):
    client_states = jax.tree.map(lambda full, n, c=c: full.at[int(c)].set(n), client_states, new)
  return state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                        alg_state=alg_state, client_states=client_states,
                        round=state.round + 1), sampled


# XLA without LLVM's optimisations: a quarter to a third less compile time. For
# tests that check what runs and what is written (keys, finiteness, files), not
# the numbers; numerics are tested compiled as users compile them.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0,
                        "xla_llvm_disable_expensive_passes": True}


def fast_compiler_options() -> dict:
  """The round's own ``compiler_options`` plus :data:`FAST_COMPILE_OPTIONS`."""
  return {**(xla_compiler_options() or {}), **FAST_COMPILE_OPTIONS}


def driver_env() -> dict[str, str]:
  """The environment of a driver run in a subprocess by an end-to-end test.

  Those tests check what a driver writes and resumes (tables, CSV, figures), not
  the numbers in them, and their subprocesses spend most of their time compiling
  rounds: compiled with :data:`FAST_COMPILE_OPTIONS` the Table III grid's test
  takes a quarter less.
  """
  flags = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE_OPTIONS.items())
  return {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
