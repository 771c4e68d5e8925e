"""FedALA (Zhang, Hua, Wang, Song, Xue, Ma, Guan, AAAI 2023): adaptive local aggregation.

"FedALA: Adaptive Local Aggregation for Personalized Federated Learning",
Algorithm 1 and the ALA module (the authors' code: TsingZ0/FedALA,
system/utils/ALA.py). Each client keeps its local model ``Θ_i`` across rounds.
A sampled client does not start from the received global model ``Θ`` but from
the adaptive local aggregation

``Θ̂_i = Θ_i + (Θ − Θ_i) ⊙ W_i``

on the top ``p`` layers, the lower layers taking ``Θ`` as they are. ``W_i`` are
element-wise weights in ``[0, 1]`` (one per parameter of those layers, all 1 at
the start), kept by the client across rounds and learned on a random fraction
``s`` of its training data by ``W_i ← clip(W_i − η ∇_{W_i} L(Θ̂_i), 0, 1)``, one
step per mini-batch, where ``∇_{W} L = ∇_{Θ̂} L ⊙ (Θ − Θ_i)``. The client then
trains ``Θ̂_i`` as FedAvg does, keeps the result as its new ``Θ_i`` and uploads
it; the server averages the local models (FedAvg). ``L`` is the client
objective ``L_T`` (cross-entropy plus the ISR terms) throughout.

How long ``W_i`` is learned (the authors' ALA module): until convergence the
first time ALA runs on a client, one epoch of the sample every later time. The
first ALA happens only once the local model differs from the global one: at a
client's first participation in round 0 both are the initial model, Θ̂ = Θ and
there is nothing to learn. "Convergence" is the authors' test: more than
``num_pre_loss`` (10) epochs recorded and the standard deviation of the last
``num_pre_loss`` epoch losses below ``threshold`` (0.1). Bounded so it jits:
the epochs run in a ``lax.while_loop`` capped at ``max_start_epochs``; each
epoch is a ``lax.scan`` over the sample's batches (a masked partial batch
included), and the recorded loss is the epoch's mean batch loss (the authors
record the last batch's, which for a partial batch is noise).

Choices where the paper leaves room:

* ``p`` (``layers``): ``"head"`` — the output layer, the authors' default
  (their code's ``layer_idx = 2`` parameter tensors: the last layer's weight
  and bias) — or ``"all"`` (every parameter, ISR adapters included: the
  authors' ``layer_idx = 0``). With ``"head"`` the body and the (aggregated)
  ISR adapters are the global ones. Other depths would need a layer order
  the models do not declare; their head/body split is what they name.
* The sample: ``max(1, ⌊s·n_i⌋)`` of the client's ``n_i`` real examples drawn
  without replacement each round (the authors take a contiguous slice at a
  random offset and drop the last partial batch, which leaves a small client
  nothing to learn from), the same batches in the same order every epoch.
* The blend is computed as ``Θ + (Θ_i − Θ) ⊙ (1 − W)``, the same expression
  rearranged, so ``W = 1`` gives ``Θ`` bit for bit (``η = 0`` keeps every
  client on the received global model: FedAvg).
* Evaluation: client ``i``'s personalized model is the one it would start its
  next round from: ALA of the current global model with its local model and
  ``W_i``, the weights learned as in training (one epoch, or the first-time
  schedule) but not kept. The authors' code evaluates right after ALA, so this
  is the model it evaluates. Their server also runs ALA on the clients it did
  not select (``send_models`` visits every client) and keeps the result; here a
  client's state changes only when it is sampled, so an unselected client's
  next ALA starts from its last trained local model and its kept ``W``.

Memory: every client keeps a whole local model and the weights of the ALA
layers in ``client_states["alg"]`` with a leading axis over all ``N`` clients:
``N × (model + adapters + ALA-layer) bytes`` — linear in ``N``; with
``layers="all"`` twice a model per client (ResNet-18, 44.7 MB float32: 8.9 GB
for 100 clients), with ``"head"`` one model plus the output layer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.config_checks import check_integer, check_number, check_one_of
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import Batch, FLAlgorithm, loss_grad
from isr_jax.fl.algorithms.fedavg import client_final as fedavg_client_final
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.personal import is_head, merge, select

ALA_LAYERS = ("head", "all")
_SAMPLE_STREAM = 0xA1A  # the ALA sample's key, apart from the local run's shuffle


def ala_part(layers: str):
  """``path -> bool``: the leaves ALA blends (``"head"``: the output layer; ``"all"``)."""
  if layers not in ALA_LAYERS:
    raise ValueError(f"layers={layers!r} is not one of {ALA_LAYERS}")
  return (lambda path: True) if layers == "all" else is_head


def blend(global_params, local_params, weights, part):
  """``Θ̂``: ``Θ + (Θ_i − Θ) ⊙ (1 − W)`` on the ``part`` leaves, ``Θ`` elsewhere."""
  glob, own = select(global_params, part), select(local_params, part)
  mixed = jax.tree.map(lambda g, o, w: g + (o - g) * (1 - w), glob, own, weights)
  return merge(global_params, mixed)


def _equal(a, b) -> jax.Array:
  same = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.all(x == y), a, b))
  return functools.reduce(jnp.logical_and, same, jnp.asarray(True))


def ala_sample(key, slot_mask, batch_size: int, fraction: float):
  """Slot indices ``[T, B]`` and validity of ``max(1, ⌊s·n⌋)`` random real examples."""
  slots = slot_mask.shape[0]
  size = max(1, math.ceil(fraction * slots))  # static bound on the sample
  n = jnp.sum(slot_mask)
  m = jnp.minimum(jnp.maximum(jnp.floor(fraction * n).astype(jnp.int32), 1), n)
  order = jnp.argsort(jnp.where(slot_mask, jax.random.uniform(key, slot_mask.shape), 2.0))
  steps = -(-size // batch_size)
  idx = jnp.zeros(steps * batch_size, order.dtype).at[:size].set(order[:size])
  valid = jnp.arange(steps * batch_size) < m
  return idx.reshape(steps, batch_size), valid.reshape(steps, batch_size)


def learn_weights(global_params, local_params, weights, started, trainer, *, part, eta,
                  fraction, threshold, num_pre_loss, max_start_epochs):
  """The ALA module's weight learning: ``(W, started, epochs)`` after it.

  Args:
    global_params: the received global model ``Θ``.
    local_params: the client's local model ``Θ_i``.
    weights: ``W_i`` over the ``part`` leaves.
    started: whether ALA has run on this client before (then one epoch).
    trainer: the client's :class:`isr_jax.fl.algorithm.LocalTrainer` (data, key, objective).
    part, eta, fraction, threshold, num_pre_loss, max_start_epochs: see the module.
  """
  data, problem = trainer.data, trainer.problem
  flat = lambda a: a.reshape((-1,) + a.shape[2:])
  x, y = flat(data.x), flat(data.y)
  idx, valid = ala_sample(jax.random.fold_in(trainer.key, _SAMPLE_STREAM),
                          data.mask.reshape(-1), data.mask.shape[-1], fraction)

  def step(w, t):
    batch = Batch(x[idx[t]], y[idx[t]], valid[t])
    loss, grads = jax.value_and_grad(
        lambda v: problem.loss(blend(global_params, local_params, v, part), batch)[0])(w)
    active = jnp.any(valid[t])
    new = jax.tree.map(lambda v, g: jnp.where(active, jnp.clip(v - eta * g, 0.0, 1.0), v),
                       w, grads)
    return new, (loss, active)

  def epoch(carry):
    w, history, count = carry
    w, (losses, active) = lax.scan(step, w, jnp.arange(idx.shape[0]))
    mean = jnp.sum(jnp.where(active, losses, 0.0)) / jnp.maximum(jnp.sum(active), 1)
    return w, history.at[count % num_pre_loss].set(mean), count + 1

  differs = ~_equal(select(global_params, part), select(local_params, part))
  limit = jnp.where(differs, jnp.where(started, 1, max_start_epochs), 0)

  def going(carry):
    _, history, count = carry
    converged = (count > num_pre_loss) & (jnp.std(history) < threshold)
    return (count < limit) & ~converged

  w, _, count = lax.while_loop(going, epoch,
                               (weights, jnp.zeros(num_pre_loss, jnp.float32), jnp.int32(0)))
  return w, started | (count > 0), count


def fedala(eta: float = 0.1, fraction: float = 0.1, layers: str = "head", *,
           threshold: float = 0.1, num_pre_loss: int = 10,
           max_start_epochs: int = 50) -> FLAlgorithm:
  """FedALA with weight learning rate ``eta`` (η ≥ 0), sample ``fraction`` (s ∈ (0, 1]),
  the ``layers`` ALA blends (:data:`ALA_LAYERS`) and the first-time convergence test."""
  if eta < 0:
    raise ValueError(f"eta={eta} must be >= 0")
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction} must be in (0, 1]")
  part = ala_part(layers)
  ala = functools.partial(learn_weights, part=part, eta=eta, fraction=fraction,
                          threshold=threshold, num_pre_loss=int(num_pre_loss),
                          max_start_epochs=int(max_start_epochs))

  def init_client_state(params, client_data=None):
    """``Θ_i`` = the initial global model, ``W_i`` = 1, no ALA run yet."""
    del client_data
    if layers == "head" and "head" not in params["model"]:
      raise ConfigError("fl.fedala.layers='head' needs a model whose classifier is "
                        f"params['model']['head']; this one has {sorted(params['model'])}")
    return {"local": params,
            "weights": jax.tree.map(jnp.ones_like, select(params, part)),
            "started": jnp.asarray(False)}

  def client_init(broadcast, client_state, client_data):
    del broadcast, client_data
    return dict(client_state)

  def local_update(start, ctx, trainer):
    """ALA from the received ``Θ`` (``start``), then the round's local training."""
    w, started, _ = ala(start, ctx["local"], ctx["weights"], ctx["started"], trainer)
    begin = blend(start, ctx["local"], w, part)
    params, aux_sum, num_steps = trainer.train(
        begin, lambda p, b, k: loss_grad(p, b, trainer.problem))
    return params, {**ctx, "weights": w, "started": started}, aux_sum, num_steps

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads ``Θ_i − Θ`` (FedAvg: the server averages the local models) and keeps ``Θ_i``."""
    message, _ = fedavg_client_final(broadcast, ctx, local_params, num_steps, client_state)
    return message, {"local": local_params, "weights": ctx["weights"],
                     "started": ctx["started"]}

  def eval_model(params, client_state, trainer):
    """The model client ``i`` would start its next round from (ALA, weights not kept)."""
    w, _, _ = ala(params, client_state["local"], client_state["weights"],
                  client_state["started"], trainer)
    model = blend(params, client_state["local"], w, part)["model"]
    return lambda x: trainer.problem.apply(model, x)[0]

  return fedavg()._replace(
      name="fedala", init_client_state=init_client_state, client_init=client_init,
      client_final=client_final, local_update=local_update, eval_model=eval_model)


# FedALA (Zhang et al., AAAI 2023): η = 0.1 and s = 0.1, FedAIMS's settings
# (FedAIMS paper §5.1: "random sampling ratio 0.1, local aggregation
# learning rate 0.1"; the authors' code runs η = 1.0, s = 80 %). ALA on the
# output layer, the authors' p (TsingZ0/FedALA main.py: layer_idx = 2 tensors,
# the last layer's weight and bias); the convergence test of the first ALA,
# threshold 0.1 over the last 10 epoch losses, is their ALA.py's default. The
# cap of 50 epochs on that first ALA is ours (it must be bounded to jit).
DEFAULTS = dict(eta=0.1, sample_fraction=0.1, layers="head", threshold=0.1, num_pre_loss=10,
                max_start_epochs=50)


def settings(config, name: str = "fedala") -> dict:
  """:func:`fedala`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(
      eta=check_number(c.eta, f"fl.{name}.eta", low=0),
      fraction=check_number(c.sample_fraction, f"fl.{name}.sample_fraction", low=0, high=1,
                            low_open=True),
      layers=check_one_of(c.layers, ALA_LAYERS, f"fl.{name}.layers"),
      threshold=check_number(c.threshold, f"fl.{name}.threshold", low=0, low_open=True),
      num_pre_loss=check_integer(c.num_pre_loss, f"fl.{name}.num_pre_loss"),
      max_start_epochs=check_integer(c.max_start_epochs, f"fl.{name}.max_start_epochs"))
