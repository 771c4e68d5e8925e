"""Local training as a masked ``lax.scan``, and the map over clients.

A client's data is one row of :class:`isr_jax.data.ClientData`: ``S·B`` slots,
real examples first. Each round a client draws a fresh order of its examples
(from its own key, so the result does not depend on which other clients were
sampled) and the scan walks ``T`` steps of ``B`` slot indices:

* epochs mode (``local_steps == 0``): ``E`` independent permutations, ``T = E·S``;
  a client with fewer than ``S`` batches gets all-padding steps at the end of
  each epoch, and a step whose batch is all padding leaves params and optimizer
  state exactly as they were (uneven clients, methods §2);
* steps mode (``local_steps = T``): one permutation per round, cycled, so every
  step is a full batch of real examples ("shuffle, repeat, batch").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from isr_jax.fl.algorithm import Batch
from isr_jax.nn.lowering import textbook_lowering
from isr_jax.sharding import CLIENT_AXIS

CLIENT_PARALLELISM = ("auto", "vmap", "chunked", "sequential")


# On CPU, a local step of at most this many FLOPs (forward and backward, textbook
# convolutions: :func:`local_step_flops`) is bound by XLA's per-kernel dispatch rather
# than by arithmetic, and a vmapped chunk of clients pays that dispatch once for the
# whole chunk. Chunked against sequential, measured side by side (benchmarks/RESULTS.md
# §2, `--sections=auto_rule`): LeNet-5 at 28×28, batch 16 (39 MFLOP) 1.09–1.31× with
# chunks of 4 in every run; at 8×8 (4–17 MFLOP) 0.90–1.18× with chunks of 10–20,
# trading places with the machine's state; above the threshold sequential won or
# tied: FedAvg CNN at 8×8, batch 16 (55 MFLOP) 0.81–0.98×, LeNet-5 at 28×28, batch
# 32 / 64 (79 / 158 MFLOP) 0.86–1.05× / 0.81–0.96×.
CPU_DISPATCH_BOUND_STEP_FLOPS = 50e6
# ... and chunks run fastest at about this much work per vmapped step: LeNet-5 at
# 28×28, batch 16, chunks of 2 / 4 / 10: 0.99× / 1.09× / 1.12× sequential's speed;
# at 8×8, batch 64, chunks of 5 / 8 / 10: 0.95× / 1.05× / 1.01×; at 8×8, batch 16,
# chunks of 20 / 50: 1.01× / 0.93× (0.91× / 0.73× in a slower run).
CPU_CHUNK_STEP_FLOPS = 150e6


def resolve_parallelism(strategy: str) -> str:
  """``auto`` -> the strategy the benchmark found fastest on this backend for most models.

  On CPU a per-client ``lax.map`` (``sequential``) with the ``xla_cpu``
  convolution beats vmapping clients, whose convolutions become grouped ones;
  on GPU/TPU clients are vmapped (benchmarks/RESULTS.md). Where the local step's
  cost is known, :func:`auto_parallelism` refines this for dispatch-bound steps.
  """
  if strategy not in CLIENT_PARALLELISM:
    raise ValueError(
        f"fl.client_parallelism={strategy!r} is not one of {list(CLIENT_PARALLELISM)}")
  if strategy != "auto":
    return strategy
  return "sequential" if jax.default_backend() == "cpu" else "vmap"


def auto_parallelism(strategy: str, chunk_size: int, *, clients: int,
                     step_flops: Callable[[], float]) -> tuple[str, int]:
  """``(strategy, chunk_size)`` that a round runs; ``auto`` becomes a concrete strategy.

  ``auto`` is :func:`resolve_parallelism`'s choice, except on CPU for a local
  step of at most :data:`CPU_DISPATCH_BOUND_STEP_FLOPS`: then chunked, with the
  divisor of ``clients`` (those one device maps) nearest to
  ``CPU_CHUNK_STEP_FLOPS / step_flops`` as the chunk size — a remainder would be
  a second vmapped program, compiled separately (twice the compile time).
  ``step_flops`` is called only then. Other strategies pass through unchanged.
  """
  strategy_now = resolve_parallelism(strategy)
  if strategy != "auto" or strategy_now != "sequential" or clients < 2:
    return strategy_now, chunk_size
  flops = step_flops()
  if not 0 < flops <= CPU_DISPATCH_BOUND_STEP_FLOPS:
    return "sequential", chunk_size
  target = CPU_CHUNK_STEP_FLOPS / flops
  divisors = [d for d in range(2, clients + 1) if clients % d == 0]
  return "chunked", min(divisors, key=lambda d: abs(math.log(d / target)))


def local_step_flops(loss: Callable[[Any, Batch], Any], params: Any, batch: Batch) -> float:
  """XLA's count of one local step's FLOPs: the loss's forward pass, × 3 for the backward.

  Counted on the traced program before optimisation (lowering only, no
  compile: ~0.1 s for a small CNN), with textbook convolutions
  (:func:`~isr_jax.nn.lowering.textbook_lowering`): the count measures the
  model's arithmetic, not the zeros a CPU lowering multiplies. The backward of
  a network costs about twice its forward.
  """
  with textbook_lowering():  # a fresh function: a cached trace would keep its lowering
    cost = jax.jit(lambda p, b: loss(p, b)).lower(params, batch).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return 3.0 * float((cost or {}).get("flops", 0.0))


def _valid_first_permutation(key: jax.Array, slot_mask: jax.Array) -> jax.Array:
  """A uniformly random order of the real slots, followed by the padding slots."""
  u = jax.random.uniform(key, slot_mask.shape)
  return jnp.argsort(jnp.where(slot_mask, u, 2.0))


def batch_schedule(
    key: jax.Array,
    slot_mask: jax.Array,
    batch_size: int,
    *,
    epochs: int,
    steps: int,
) -> tuple[jax.Array, jax.Array]:
  """Slot indices ``[T, B]`` and their validity for one client's local training.

  Args:
    key: the client's key for this round.
    slot_mask: ``[S·B]`` bool, the client's real slots (a prefix).
    batch_size: ``B``.
    epochs: local epochs ``E`` (used when ``steps == 0``).
    steps: fixed number of local steps ``T`` (0 selects epochs mode).

  Returns:
    ``(idx, valid)``, both ``[T, B]``.
  """
  slots = slot_mask.shape[0]
  n = jnp.sum(slot_mask)
  if steps == 0:
    keys = jax.random.split(key, epochs)
    perms = jax.vmap(_valid_first_permutation, in_axes=(0, None))(keys, slot_mask)
    idx = perms.reshape(epochs * slots // batch_size, batch_size)
    valid = jnp.tile(jnp.arange(slots) < n, epochs).reshape(idx.shape)
    return idx, valid
  perm = _valid_first_permutation(key, slot_mask)
  pos = jnp.arange(steps * batch_size) % jnp.maximum(n, 1)
  idx = perm[pos].reshape(steps, batch_size)
  return idx, jnp.broadcast_to(n > 0, idx.shape)


def run_local_steps(
    params: Any,
    opt_state: Any,
    x: jax.Array,
    y: jax.Array,
    idx: jax.Array,
    valid: jax.Array,
    *,
    grad_fn: Callable[[Any, Batch, jax.Array], tuple[Any, dict[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    unroll: int | bool = 1,
    all_or_none: bool = False,
    project: Callable[[Any], Any] | None = None,
):
  """Runs ``T`` masked optimizer steps over slot-indexed batches.

  Args:
    params: starting parameters.
    opt_state: starting optimizer state.
    x: the client's inputs, flattened to ``[S·B, ...]``.
    y: the client's labels, ``[S·B, ...]``.
    idx: ``[T, B]`` slot indices from :func:`batch_schedule`.
    valid: ``[T, B]`` validity of those slots.
    grad_fn: ``(params, batch, key) -> (grads, aux)``.
    optimizer: the local optax optimizer.
    key: base key; step ``t`` gets ``fold_in(key, t)``.
    unroll: ``lax.scan`` unroll factor (steps mode).
    all_or_none: the caller promises every step is active or none is (steps
      mode of :func:`batch_schedule`): the "an all-padding step changes
      nothing" rule is then applied once after the loop instead of at every
      step, which spares each step a select over the parameters and optimizer
      state and the copy of them it forces (7 % of a FedAvg-CNN round on CPU).
    project: applied to the parameters after every step (projected SGD onto a
      constraint set, e.g. APFL's mixing weight onto [0, 1]); ``None``: none.

  Returns:
    ``(params, opt_state, aux_sum, num_steps)``: final state, the per-term sums
    over the steps that ran, and how many steps ran.
  """

  def take_step(params, opt_state, t, idx_t, valid_t):
    batch = Batch(x=x[idx_t], y=y[idx_t], mask=valid_t)
    grads, aux = grad_fn(params, batch, jax.random.fold_in(key, t))
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return (new_params if project is None else project(new_params)), new_opt_state, aux

  active = jnp.any(valid, axis=1)
  num_steps = jnp.sum(active.astype(jnp.int32))
  if all_or_none:
    def step(carry, inputs):
      *carry, aux = take_step(*carry, *inputs)
      return tuple(carry), aux

    steps = jnp.arange(idx.shape[0])
    (new_params, new_opt_state), aux = lax.scan(
        step, (params, opt_state), (steps, idx, valid), unroll=unroll)
    # No step ran: the start, whatever the loop computed (even NaN).
    params, opt_state = otu.tree_where(
        num_steps > 0, (new_params, new_opt_state), (params, opt_state))
    aux_sum = jax.tree.map(lambda v: jnp.where(num_steps > 0, jnp.sum(v, axis=0), 0.0), aux)
    return params, opt_state, aux_sum, num_steps

  # Only the active steps run, in their order, as a loop of dynamic length: an
  # all-padding step changes nothing (not even the optimizer's count) because
  # it never runs. A client that is not vmapped (``sequential``, the CPU
  # default) then costs its own Σ steps, not the longest client's; under vmap
  # the loop runs the longest lane and masks the others, as a scan would.
  order = jnp.argsort(~active, stable=True)

  def body(i, carry):
    params, opt_state, aux_sum = carry
    t = order[i]
    params, opt_state, aux = take_step(params, opt_state, t, idx[t], valid[t])
    return params, opt_state, jax.tree.map(jnp.add, aux_sum, aux)

  aux_shape = jax.eval_shape(lambda: take_step(params, opt_state, 0, idx[0], valid[0])[2])
  aux_sum = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape)
  params, opt_state, aux_sum = lax.fori_loop(0, num_steps, body, (params, opt_state, aux_sum))
  return params, opt_state, aux_sum, num_steps


def map_clients(fn: Callable, args: tuple, shared: tuple = (), *, strategy: str = "vmap",
                chunk_size: int = 0, mesh: Mesh | None = None, summed: bool = False):
  """``fn(*client_args, *shared)`` for every client (leading axis of ``args``), in one jit.

  ``vmap`` runs all clients at once; ``sequential`` one at a time with
  ``lax.map`` (bounded memory); ``chunked`` ``lax.map`` over chunks of
  ``chunk_size`` vmapped clients. All three compute the same function. With a
  ``mesh``, the clients are split over its ``clients`` axis with
  ``jax.shard_map`` (their count must be a multiple of the mesh size) and each
  device applies the strategy to its own clients; ``shared`` is replicated.

  With ``summed``, ``fn`` returns ``(per_client, to_sum)`` and the result is
  ``(per_client stacked, Σ to_sum over the clients)``; the sum is carried from
  client to client (chunk to chunk) instead of stacked, so what ``to_sum``
  holds costs the memory of one client whatever their number (outside ``vmap``).
  """
  if mesh is None:
    return _map_local(fn, args, shared, strategy, chunk_size, summed)
  spec = P(CLIENT_AXIS)

  def local(a, s):
    out = _map_local(fn, a, s, strategy, chunk_size, summed)
    # Each device's partial sum gets a leading axis of its own; they are added below.
    return (out[0], jax.tree.map(lambda v: v[None], out[1])) if summed else out

  # No collectives run inside a client; the scan carry starts as the replicated
  # global model and becomes per-client, which the varying-axes check rejects.
  out = jax.shard_map(local, mesh=mesh, in_specs=(spec, P()), out_specs=spec,
                      check_vma=False)(args, shared)
  return (out[0], jax.tree.map(lambda v: jnp.sum(v, axis=0), out[1])) if summed else out


def _map_local(fn: Callable, args: tuple, shared: tuple, strategy: str, chunk_size: int,
               summed: bool = False):
  per_client = lambda a: fn(*a, *shared)
  strategy = resolve_parallelism(strategy)
  if strategy not in ("vmap", "sequential", "chunked"):
    raise ValueError(
        f"fl.client_parallelism={strategy!r} is not one of {list(CLIENT_PARALLELISM)}")
  if not summed:
    if strategy == "vmap":
      return jax.vmap(per_client)(args)
    return lax.map(per_client, args,
                   batch_size=max(int(chunk_size), 1) if strategy == "chunked" else None)
  # Jitted so that shape inference and the loop body share one trace (a nested
  # jit is inlined when the round compiles).
  lanes = jax.jit(jax.vmap(per_client))
  add = lambda a, b: jax.tree.map(jnp.add, a, b)
  lane_sum = lambda tree: jax.tree.map(lambda v: jnp.sum(v, axis=0), tree)
  num = jax.tree.leaves(args)[0].shape[0]
  size = max(int(chunk_size), 1)
  if strategy == "vmap" or (strategy == "chunked" and size >= num):
    outs, to_sum = lanes(args)
    return outs, lane_sum(to_sum)
  if strategy == "sequential":
    client = jax.jit(per_client)
    zeros = _zeros_like_shape(jax.eval_shape(client, _row(args, 0))[1])

    def one(total, a):
      outs, to_sum = client(a)
      return add(total, to_sum), outs

    total, outs = lax.scan(one, zeros, args)
    return outs, total
  # chunked, split as lax.map(batch_size=…) splits: whole chunks in a scan, the
  # remainder vmapped after it.
  whole = num // size * size
  chunks = jax.tree.map(lambda a: a[:whole].reshape((num // size, size) + a.shape[1:]), args)
  zeros = _zeros_like_shape(jax.eval_shape(lanes, _row(chunks, 0))[1])
  zeros = jax.tree.map(lambda z: z[0], zeros)

  def one_chunk(total, a):
    outs, to_sum = lanes(a)
    return add(total, lane_sum(to_sum)), outs

  total, outs = lax.scan(one_chunk, zeros, chunks)
  outs = jax.tree.map(lambda v: v.reshape((whole,) + v.shape[2:]), outs)
  if whole < num:
    rest, rest_sum = lanes(jax.tree.map(lambda a: a[whole:], args))
    outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, rest)
    total = add(total, lane_sum(rest_sum))
  return outs, total


def _row(tree, i: int):
  return jax.tree.map(lambda a: a[i], tree)


def _zeros_like_shape(shapes):
  return jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype), shapes)
