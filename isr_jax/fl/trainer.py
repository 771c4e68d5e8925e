"""One client's part of a round: its local trainer, and its whole round from start to message.

:func:`make_trainer` lends an algorithm the engine's local optimizer, data
schedule and step masking on one client's data (:class:`LocalTrainer`);
:func:`client_round` is what the client map runs for every sampled client:
start from the broadcast (with the client's personal leaves put in), train as
the algorithm says, and return the message with the client's new state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import Batch, LocalTrainer, ServerBroadcast, loss_grad
from isr_jax.fl.channel.pipeline import send
from isr_jax.fl.channel.stragglers import keep_steps
from isr_jax.fl.client import batch_schedule, run_local_steps
from isr_jax.fl.personal import merge, select, zero_personal
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.optim import with_learning_rate


def _flat(a: jax.Array) -> jax.Array:
  """``[S, B, ...] -> [S·B, ...]``: a client's slots in one axis."""
  return a.reshape((-1,) + a.shape[2:])


def _trainable_flag(value, path):
  """``trainable(path)`` as a Python bool, or as a boolean scalar array when it is traced."""
  if isinstance(value, jax.Array):
    if value.shape != () or value.dtype != jnp.bool_:
      raise ValueError(f"trainable({jax.tree_util.keystr(path)}) must be a bool or a boolean "
                       f"scalar; got {value.dtype}{list(value.shape)}")
    return value
  return bool(value)


def _freeze(optimizer: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """``optimizer`` whose updates of the leaves where ``trainable`` is False are zero.

  Zeroing the update (not the gradient) keeps weight decay and momentum from
  moving a frozen leaf; the optimizer's state keeps its structure. A flag may be
  a traced boolean scalar, decided per client inside the round (FedAIMS's
  sampled block): that leaf's update is selected with ``jnp.where``, the update or
  exactly zero. Python flags stay static, so their graph is unchanged.
  """

  def freeze(u, t):
    if isinstance(t, jax.Array):
      return jnp.where(t, u, jnp.zeros_like(u))
    return u if t else jnp.zeros_like(u)

  def update(grads, state, params=None):
    updates, state = optimizer.update(grads, state, params)
    return jax.tree.map(freeze, updates, trainable), state

  return optax.GradientTransformation(optimizer.init, update)


def make_trainer(cdata: ClientData, key: jax.Array, lr: jax.Array, fns: RoundFns,
                 spec: FLSpec, work: jax.Array | None = None) -> LocalTrainer:
  """Client ``cdata``'s :class:`LocalTrainer`: local SGD on its own data this round.

  ``work`` (a straggler's share of its steps, :mod:`isr_jax.fl.channel.stragglers`)
  cuts each of its runs of the round's schedule to that share; ``None``: all.
  """
  x, y, slot_mask = _flat(cdata.x), _flat(cdata.y), cdata.mask.reshape(-1)

  def train(start, grad_fn, *, epochs=None, trainable=None, stream=0, project=None):
    k = key if stream == 0 else jax.random.fold_in(key, 7919 + stream)
    round_schedule = epochs is None
    idx, valid = batch_schedule(
        k, slot_mask, cdata.mask.shape[-1],
        epochs=spec.local_epochs if round_schedule else epochs,
        steps=spec.local_steps if round_schedule else 0)
    cut = work is not None and round_schedule
    if cut:  # a straggler runs only the first steps of its schedule
      valid = valid & keep_steps(jnp.any(valid, axis=1), work)[:, None]
    optimizer = fns.local_optimizer
    if trainable is not None:
      mask = jax.tree_util.tree_map_with_path(
          lambda path, _: _trainable_flag(trainable(path), path), start)
      optimizer = _freeze(optimizer, mask)
    opt_state = with_learning_rate(optimizer.init(start), lr)
    params, _, aux_sum, num_steps = run_local_steps(
        start, opt_state, x, y, idx, valid, grad_fn=grad_fn, optimizer=optimizer, key=k,
        unroll=spec.unroll, all_or_none=round_schedule and spec.local_steps > 0 and not cut,
        project=project)
    return params, aux_sum, num_steps

  return LocalTrainer(train=train, problem=fns.problem, data=cdata, key=key)


def client_round(fns: RoundFns, spec: FLSpec, key_clients: jax.Array, key_send: jax.Array,
                 personal: Callable) -> Callable:
  """The function the client map runs for each sampled client.

  ``(client_data, client_state, client_id, plan, lane, params, alg_state, round, lr) ->
  (message, new_client_state, aux_sum, num_steps, drift, grad_at_start)``; with
  ``mean_messages`` the message comes last, multiplied by the client's example
  count, so the map can sum it as the clients finish. ``drift`` is ``‖θ_i − θ_t‖²``
  of the model; ``grad_at_start`` is ``∇L_T^n(θ_t)`` on the first scheduled batch
  when the round measures heterogeneity (else ``{}``). ``lane`` is what the
  channel decided for the client (its share of work); its message goes through
  the channel's :func:`~isr_jax.fl.channel.pipeline.send` (compression).
  """
  alg = fns.algorithm

  def one_client(cdata: ClientData, cstate, client_id, plan, lane, params, alg_state,
                 round_index, lr):
    start = merge(params, cstate.get("personal", {}))
    broadcast = ServerBroadcast(start, alg_state, round_index, lr, plan)
    ctx = alg.client_init(broadcast, cstate["alg"], cdata)
    key = jax.random.fold_in(key_clients, client_id)
    work = None if spec.channel.stragglers is None else lane.work
    trainer = make_trainer(cdata, key, lr, fns, spec, work)
    if alg.local_update is None:
      params, aux_sum, num_steps = trainer.train(
          start, lambda p, b, k: alg.client_grad(p, ctx, b, fns.problem, k))
    else:
      params, ctx, aux_sum, num_steps = alg.local_update(start, ctx, trainer)
    message, new_alg_state = alg.client_final(broadcast, ctx, params, num_steps, cstate["alg"])
    if spec.channel.compression is not None:  # what stays home is neither sent nor kept
      message = zero_personal(message, personal)
    message, channel_state = send(jax.random.fold_in(key_send, client_id), message,
                                  cstate.get("channel", {}), spec.channel)
    new_cstate = {**cstate, "alg": new_alg_state}
    if "channel" in cstate:
      new_cstate["channel"] = channel_state
    if "personal" in cstate:
      new_cstate["personal"] = select(params, personal)
    drift = otu.tree_norm(otu.tree_sub(params["model"], start["model"]), squared=True)
    grad_at_start = {}
    if spec.measure_heterogeneity:  # ∇L_T^n(θ_t), estimated on the first scheduled batch
      idx, valid = batch_schedule(key, cdata.mask.reshape(-1), cdata.mask.shape[-1],
                                  epochs=spec.local_epochs, steps=spec.local_steps)
      first = Batch(_flat(cdata.x)[idx[0]], _flat(cdata.y)[idx[0]], valid[0])
      grad_at_start, _ = loss_grad(start, first, fns.problem)
    outputs = (new_cstate, aux_sum, num_steps, drift, grad_at_start)
    if alg.mean_messages and not spec.channel.reads_each_message:  # n_i·m_i, summed as they finish
      n = cdata.num_examples.astype(jnp.float32)
      return outputs, jax.tree.map(lambda m: n.astype(m.dtype) * m, message)
    return (message, *outputs)

  return one_client
