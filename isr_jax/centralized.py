"""Centralized (CL) training on ``L_T`` (OmniISR paper Algorithm 1, CL branch).

``cl_step`` is one optimizer step on one batch; ``cl_round`` is one epoch of it
as a ``lax.scan`` in one jit (a "round" in CL mode, so all modes log per round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import Batch, LocalProblem, loss_grad
from isr_jax.fl.client import batch_schedule, run_local_steps
from isr_jax.optim import with_learning_rate
from isr_jax.state import TrainState


def cl_step(params, opt_state, batch: Batch, *, problem: LocalProblem,
            optimizer: optax.GradientTransformation):
  """One step ``θ ← θ − opt(∇L_T(θ; batch))``: ``-> (params, opt_state, aux)``."""
  grads, aux = loss_grad(params, batch, problem)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, aux


def cl_round(state: TrainState, data: ClientData, *, problem: LocalProblem,
             optimizer: optax.GradientTransformation, lr_fn, unroll: int = 1):
  """One epoch over the pooled training set (``data`` holds a single client)."""
  key = jax.random.fold_in(state.rng, state.round)
  idx, valid = batch_schedule(key, data.mask[0].reshape(-1), data.batch_size, epochs=1, steps=0)
  opt_state = with_learning_rate(state.opt_state, lr_fn(state.round))
  flat = lambda a: a[0].reshape((-1,) + a.shape[3:])
  params, opt_state, aux_sum, num_steps = run_local_steps(
      state.params, opt_state, flat(data.x), flat(data.y), idx, valid,
      grad_fn=lambda p, b, k: loss_grad(p, b, problem), optimizer=optimizer, key=key,
      unroll=unroll,
  )
  metrics = {f"train/{k}": v / jnp.maximum(num_steps, 1) for k, v in aux_sum.items()}
  metrics["train/loss"] = metrics.pop("train/total")
  return state._replace(params=params, opt_state=opt_state, round=state.round + 1), metrics
