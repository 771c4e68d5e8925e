"""Hybrid CL–FL rounds (OmniISR paper Eq. 9, Algorithm 1 lines 36–42; methods §2).

Both sides are expressed as parameter displacements from ``θ_t``:
``Δ_CL = θ_t − θ_cloud`` (``cloud_steps`` local-optimizer steps on cloud
batches; with one plain-SGD step of rate η_t this is ``η_t g_CL``) and
``Δ_FL = θ_t − θ̃_{t+1}`` (the FL algorithm's pseudo-gradient, ``η_t g_FL``).
The server optimizer is fed ``α_t Δ_CL + (1 − α_t) Δ_FL``; with SGD at rate 1
this is exactly Eq. 9, ``θ_{t+1} = θ_t − η_t(α_t g_CL + (1 − α_t) g_FL)``.
Adapters are mixed the same way (they are part of ``params``).

The identities of methods §2 hold on the whole :class:`TrainState`, not only on
the parameters:

* ``α_t = 0``: exactly the FL algorithm's round (params, server optimizer
  state, the algorithm's server and client state, rng, round; ``mix_weight`` is
  unchanged as in FL). The cloud step still runs — it is ``cloud_steps`` steps
  on one batch, carries no state (its optimizer state is fresh every round) and
  keeps ``cloud/*`` and ``hybrid/cos_cl_fl`` measured — but its zero weight is
  applied by selection, so not even a diverged (NaN) cloud step leaks in.
* ``α_t = 1``: one CL step. The federated step has weight 0, so none of its
  state may persist either: SCAFFOLD's ``c``/``c_i`` and FedDyn's ``h``/``∇L_i``
  keep their old values (otherwise FedDyn's ``θ = avg − h/α`` breaks). Where
  ``α_t = 1`` does not need ``cos(g_CL, g_FL)`` — ``alternating`` (even rounds),
  ``fixed`` (α = 1), and ``adaptive`` with the ``paper`` rule, for which α = 1 is
  absorbing (``α + β(1 − s) ≥ α`` for every ``s ≤ 1``) — a ``lax.cond`` skips the
  clients entirely: no local training, nothing communicated (half the cost of
  ``alternating``). The ``signed`` rule needs ``s`` at α = 1 (``1 − βs`` may
  leave 1), so there the clients do run, as a probe: their messages travel and
  are counted, ``s`` is measured, and their state changes are dropped.

Metrics of a round whose clients were skipped (``α_t = 1`` above): nothing
trained or travelled, so ``comm/*``, ``fl/client_drift``, ``fl/local_steps`` and
``fl/heterogeneity`` are 0 (sums over an empty set of clients), ``Δ_FL = 0``
gives ``hybrid/cos_cl_fl = hybrid/inner_cl_fl = 0`` (the :func:`cosine`
convention), and ``train/<term>`` is the cloud's ``cloud/<term>`` — the only
training that ran — so that ``train/loss`` stays the round's training loss and
:mod:`isr_jax.train`'s NaN guard still stops a diverging cloud step. Terms only
the FL algorithm has (FedProx's ``prox``, ...) read 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from isr_jax.data.packing import ClientData
from isr_jax.fl.algorithm import loss_grad
from isr_jax.fl.round import FederatedUpdate, apply_server_step, federated_update
from isr_jax.fl.selection import round_keys, take_rows
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.state import TrainState

SCHEDULES = ("alternating", "fixed", "adaptive")
ADAPTIVE_RULES = ("paper", "signed")


class HybridSpec(NamedTuple):
  """Static hybrid settings.

  Attributes:
    schedule: ``alternating`` (α_t = 1 on even rounds, 0 on odd), ``fixed``
      (α_t = α_0) or ``adaptive``.
    beta: adaptive step size β.
    mix_weight_min: lower clip of adaptive α (Theorem 4 needs α_min > 0).
    adaptive_rule: ``paper`` — Algorithm 1 line 42, ``α + β(1 − s)``, which can
      only grow α; ``signed`` — ``α − β s``, which follows the paper's prose
      (well aligned ⇒ more federated weight).
    cloud_steps: local steps K on the cloud side (1 = the paper).
  """

  schedule: str = "fixed"
  beta: float = 0.1
  mix_weight_min: float = 0.0
  adaptive_rule: str = "paper"
  cloud_steps: int = 1


def mixing_weight(spec: HybridSpec, weight: jax.Array, round_index: jax.Array) -> jax.Array:
  """α_t used in round ``round_index`` given the carried α."""
  if spec.schedule == "alternating":
    return jnp.where(round_index % 2 == 0, 1.0, 0.0).astype(jnp.float32)
  return weight


def next_mix_weight(spec: HybridSpec, weight: jax.Array, cos: jax.Array) -> jax.Array:
  """α_{t+1} from α_t and ``s = cos(g_CL, g_FL)``; unchanged unless adaptive."""
  if spec.schedule != "adaptive":
    return weight
  if spec.adaptive_rule == "paper":
    proposed = weight + spec.beta * (1.0 - cos)
  else:
    proposed = weight - spec.beta * cos
  return jnp.clip(proposed, spec.mix_weight_min, 1.0).astype(jnp.float32)


def skips_clients_at_weight_one(spec: HybridSpec) -> bool:
  """Whether a round with α_t = 1 can skip the clients (it needs no ``cos``)."""
  return spec.schedule != "adaptive" or spec.adaptive_rule == "paper"


def cosine(a, b) -> jax.Array:
  """cos(a, b) over whole pytrees; 0 when either is zero."""
  denom = otu.tree_norm(a) * otu.tree_norm(b)
  return jnp.where(denom > 0, otu.tree_vdot(a, b) / jnp.where(denom > 0, denom, 1.0), 0.0)


def mix(weight: jax.Array, delta_cl, delta_fl):
  """``α Δ_CL + (1 − α) Δ_FL`` (Eq. 9), the zero-weight side dropped exactly at α ∈ {0, 1}.

  Selection, not multiplication, at the ends: ``0 · NaN`` is NaN, so a diverged
  side would otherwise break the identities α = 0 ⇒ FL and α = 1 ⇒ CL.
  """

  def one(c, f):
    mixed = weight * c + (1.0 - weight) * f
    return jnp.where(weight == 1, c, jnp.where(weight == 0, f, mixed))

  return jax.tree.map(one, delta_cl, delta_fl)


def cloud_update(state: TrainState, cloud: ClientData, fns: RoundFns, spec: HybridSpec,
                 key: jax.Array, unroll: int = 1):
  """``Δ_CL = θ_t − θ_cloud`` after ``cloud_steps`` steps of ``L_T`` on cloud batches.

  The cloud is one more client to the engine: the same trainer runs its steps.
  """
  lr = fns.local_lr(state.round)
  cloud_spec = FLSpec(clients_per_round=1, local_epochs=1, local_steps=spec.cloud_steps,
                      unroll=unroll)
  trainer = make_trainer(take_rows(cloud, 0), key, lr, fns, cloud_spec)
  params, aux_sum, num_steps = trainer.train(
      state.params, lambda p, b, k: loss_grad(p, b, fns.problem))
  metrics = {f"cloud/{k}": v / jnp.maximum(num_steps, 1) for k, v in aux_sum.items()}
  metrics["cloud/loss"] = metrics.pop("cloud/total")
  return otu.tree_sub(state.params, params), metrics


def _no_clients(state: TrainState, shapes, cloud_metrics):
  """``federated_update``'s outputs for a round whose clients did not run.

  ``Δ_FL = 0``, the algorithm's state as it was, and the metrics described in
  the module docstring (``train/<term>`` from the cloud, everything else 0).
  """
  delta_shapes, metric_shapes = shapes.pseudo_grad, shapes.metrics
  zero = lambda s: jnp.zeros(s.shape, s.dtype)

  def metric(name, s):
    if name.startswith("train/"):
      cloud = cloud_metrics.get("cloud/" + name.removeprefix("train/"))
      if cloud is not None:
        return jnp.asarray(cloud, s.dtype).reshape(s.shape)
    return zero(s)

  metrics = {name: metric(name, s) for name, s in metric_shapes.items()}
  return FederatedUpdate(jax.tree.map(zero, delta_shapes), state.alg_state,
                         state.client_states, state.channel_state, metrics)


def hybrid_round(state: TrainState, data: ClientData, cloud: ClientData, *,
                 fns: RoundFns, spec: FLSpec, hybrid: HybridSpec):
  """One hybrid round (Eq. 9): ``state -> (state, metrics)``; jit with donation."""
  weight = mixing_weight(hybrid, state.mix_weight, state.round)
  _, _, k_cloud = round_keys(state)
  delta_cl, cloud_metrics = cloud_update(state, cloud, fns, hybrid, k_cloud, spec.unroll)
  federated = lambda: federated_update(state, data, fns, spec)
  if skips_clients_at_weight_one(hybrid):
    shapes = jax.eval_shape(federated)
    update = jax.lax.cond(
        weight == 1, lambda: _no_clients(state, shapes, cloud_metrics), federated)
  else:
    # Signed adaptive rule: at α = 1 the clients run only to measure cos; their
    # step has weight 0, so their state changes are dropped.
    update = federated()
    keep = weight == 1
    update = update._replace(
        alg_state=otu.tree_where(keep, state.alg_state, update.alg_state),
        client_states=otu.tree_where(keep, state.client_states, update.client_states),
        channel_state=otu.tree_where(keep, state.channel_state, update.channel_state))
  delta_fl, metrics = update.pseudo_grad, update.metrics
  params, opt_state = apply_server_step(state, mix(weight, delta_cl, delta_fl),
                                        fns.server_optimizer)
  cos = cosine(delta_cl, delta_fl)
  lr = fns.local_lr(state.round)
  metrics.update(cloud_metrics)
  metrics["hybrid/mix_weight"] = weight
  metrics["hybrid/cos_cl_fl"] = cos
  # Lemma 5's ⟨g_CL, g_FL⟩ with g = Δ / η_t.
  metrics["hybrid/inner_cl_fl"] = otu.tree_vdot(delta_cl, delta_fl) / (lr * lr)
  # Only the adaptive schedule carries α; the others leave it as it was (so the
  # state after an α_t = 0 round is the FL round's state, mix_weight included).
  new_state = state._replace(
      params=params, opt_state=opt_state, alg_state=update.alg_state,
      client_states=update.client_states, channel_state=update.channel_state,
      round=state.round + 1, mix_weight=next_mix_weight(hybrid, state.mix_weight, cos),
  )
  return new_state, metrics
