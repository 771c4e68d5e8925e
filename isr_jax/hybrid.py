"""Hybrid CL–FL rounds (papers/omniisr.txt Eq. 9, Algorithm 1 lines 36–42; SPEC §2).

Both sides are expressed as parameter displacements from ``θ_t``:
``Δ_CL = θ_t − θ_cloud`` (``cloud_steps`` local-optimizer steps on cloud
batches; with one plain-SGD step of rate η_t this is ``η_t g_CL``) and
``Δ_FL = θ_t − θ̃_{t+1}`` (the FL algorithm's pseudo-gradient, ``η_t g_FL``).
The server optimizer is fed ``α_t Δ_CL + (1 − α_t) Δ_FL``; with SGD at rate 1
this is exactly Eq. 9, ``θ_{t+1} = θ_t − η_t(α_t g_CL + (1 − α_t) g_FL)``, and
α = 1 is one CL step, α = 0 exactly the FL round. Adapters are mixed the same
way (they are part of ``params``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import loss_grad
from isr_jax.fl.client import batch_schedule, run_local_steps
from isr_jax.fl.round import FLSpec, RoundFns, apply_server_step, federated_update, round_keys
from isr_jax.optim import with_learning_rate
from isr_jax.state import TrainState

SCHEDULES = ("alternating", "fixed", "adaptive")
ADAPTIVE_RULES = ("paper", "signed")


class HybridSpec(NamedTuple):
  """Static hybrid settings.

  Attributes:
    schedule: ``alternating`` (α_t = 1 on even rounds, 0 on odd), ``fixed``
      (α_t = α_0) or ``adaptive``.
    beta: adaptive step size β.
    alpha_min: lower clip of adaptive α (Theorem 4 needs α_min > 0).
    adaptive_rule: ``paper`` — Algorithm 1 line 42, ``α + β(1 − s)``, which can
      only grow α; ``signed`` — ``α − β s``, which follows the paper's prose
      (well aligned ⇒ more federated weight).
    cloud_steps: local steps K on the cloud side (1 = the paper).
  """

  schedule: str = "fixed"
  beta: float = 0.1
  alpha_min: float = 0.0
  adaptive_rule: str = "paper"
  cloud_steps: int = 1


def mixing_weight(spec: HybridSpec, alpha: jax.Array, round_index: jax.Array) -> jax.Array:
  """α_t used in round ``round_index`` given the carried α."""
  if spec.schedule == "alternating":
    return jnp.where(round_index % 2 == 0, 1.0, 0.0).astype(jnp.float32)
  return alpha


def next_alpha(spec: HybridSpec, alpha: jax.Array, cos: jax.Array) -> jax.Array:
  """α_{t+1} from α_t and ``s = cos(g_CL, g_FL)``; unchanged unless adaptive."""
  if spec.schedule != "adaptive":
    return alpha
  if spec.adaptive_rule == "paper":
    proposed = alpha + spec.beta * (1.0 - cos)
  else:
    proposed = alpha - spec.beta * cos
  return jnp.clip(proposed, spec.alpha_min, 1.0).astype(jnp.float32)


def cosine(a, b) -> jax.Array:
  """cos(a, b) over whole pytrees; 0 when either is zero."""
  denom = otu.tree_norm(a) * otu.tree_norm(b)
  return jnp.where(denom > 0, otu.tree_vdot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def cloud_update(state: TrainState, cloud: ClientData, fns: RoundFns, spec: HybridSpec,
                 key: jax.Array, unroll: int = 1):
  """``Δ_CL = θ_t − θ_cloud`` after ``cloud_steps`` steps of ``L_T`` on cloud batches."""
  lr = fns.local_lr(state.round)
  opt_state = with_learning_rate(fns.local_optimizer.init(state.params), lr)
  idx, valid = batch_schedule(
      key, cloud.mask[0].reshape(-1), cloud.batch_size, epochs=1, steps=spec.cloud_steps
  )
  flat = lambda a: a[0].reshape((-1,) + a.shape[3:])
  params, _, aux_sum, num_steps = run_local_steps(
      state.params, opt_state, flat(cloud.x), flat(cloud.y), idx, valid,
      grad_fn=lambda p, b, k: loss_grad(p, b, fns.problem),
      optimizer=fns.local_optimizer, key=key, unroll=unroll, all_or_none=True,
  )
  metrics = {f"cloud/{k}": v / jnp.maximum(num_steps, 1) for k, v in aux_sum.items()}
  metrics["cloud/loss"] = metrics.pop("cloud/total")
  return otu.tree_sub(state.params, params), metrics


def hybrid_round(state: TrainState, data: ClientData, cloud: ClientData, *,
                 fns: RoundFns, spec: FLSpec, hybrid: HybridSpec):
  """One hybrid round (Eq. 9): ``state -> (state, metrics)``; jit with donation."""
  delta_fl, alg_state, client_states, metrics = federated_update(state, data, fns, spec)
  _, _, k_cloud = round_keys(state)
  delta_cl, cloud_metrics = cloud_update(state, cloud, fns, hybrid, k_cloud, spec.unroll)
  alpha = mixing_weight(hybrid, state.alpha, state.round)
  mixed = jax.tree.map(lambda c, f: alpha * c + (1.0 - alpha) * f, delta_cl, delta_fl)
  params, opt_state = apply_server_step(state, mixed, fns.server_optimizer)
  cos = cosine(delta_cl, delta_fl)
  lr = fns.local_lr(state.round)
  metrics.update(cloud_metrics)
  metrics["hybrid/alpha"] = alpha
  metrics["hybrid/cos_cl_fl"] = cos
  # Lemma 5's ⟨g_CL, g_FL⟩ with g = Δ / η_t.
  metrics["hybrid/inner_cl_fl"] = otu.tree_vdot(delta_cl, delta_fl) / (lr * lr)
  new_state = state._replace(
      params=params, opt_state=opt_state, alg_state=alg_state, client_states=client_states,
      round=state.round + 1, alpha=next_alpha(hybrid, alpha, cos),
  )
  return new_state, metrics
