"""Personalized evaluation: every client's own model on its own test split (methods §4).

The personalized-FL protocol of FedAIMS §5 (and PFLlib / FL-bench): each client
holds out part of its own partition; the accuracy of client ``i``'s
*personalized* model — the global model with its personal leaves put in, or
what the algorithm's ``eval_model`` makes of it (Ditto's personal model,
FedBABU's fine-tuned head, FedRoD's two heads), or just the global model for a
non-personalized algorithm — on that split, over *all* clients, not only the
round's sampled ones. Reported as the mean ± std across clients and the
example-weighted mean. One jitted computation: the clients go through the same
client map as a round (``vmap`` / ``lax.map`` / sharded over ``clients``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isr_jax.data.packing import ClientData
from isr_jax.fl.client import map_clients
from isr_jax.fl.personal import merge
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.state import TrainState


def client_accuracy_stats(correct: jax.Array, count: jax.Array) -> dict[str, jax.Array]:
  """Mean ± std of per-client accuracy over the clients with test examples, and the
  example-weighted mean ``Σ correct / Σ count``; NaN (not 0) when no client has one."""
  has = count > 0
  acc = jnp.where(has, correct / jnp.maximum(count, 1), 0.0)
  n = jnp.maximum(jnp.sum(has), 1)
  mean = jnp.sum(acc) / n
  std = jnp.sqrt(jnp.sum(jnp.where(has, (acc - mean) ** 2, 0.0)) / n)
  undefined = lambda v: jnp.where(jnp.any(has), v, jnp.nan)  # noqa: E731
  return {"accuracy_mean": undefined(mean), "accuracy_std": undefined(std),
          "accuracy_weighted": undefined(jnp.sum(correct) / jnp.maximum(jnp.sum(count), 1)),
          "clients": jnp.sum(has).astype(jnp.float32)}


def evaluate_clients(state: TrainState, train: ClientData, test: ClientData,
                     ids: jax.Array | None = None, *, fns: RoundFns, spec: FLSpec,
                     ignore_index: int | None = None) -> dict[str, jax.Array]:
  """Per-client accuracy of the personalized models on their own test splits.

  Args:
    state: the run's state (global params, per-client state).
    train: every client's training data (rows as in the round; FedBABU fine-tunes
      on it).
    test: every client's test split, same rows.
    ids: the rows' client ids when they are some clients only (a chunk of a
      population evaluated piece by piece, :func:`isr_jax.fl.population.evaluate_population`;
      −1 marks padding rows); ``None``: row ``i`` is client ``i``.
    fns, spec: the round's pieces (the local optimizer and schedule for
      fine-tuning at evaluation).
    ignore_index: label excluded (segmentation: accuracy over labelled pixels).

  Returns:
    ``{"accuracy_mean", "accuracy_std", "accuracy_weighted", "clients"}``
    (``clients``: how many had a non-empty test split), and the vectors behind
    them, one entry per client row (padding rows included, as 0 of 0):
    ``"client_correct"`` and ``"client_examples"``.
  """
  alg = fns.algorithm
  key = jax.random.fold_in(jax.random.fold_in(state.rng, state.round), 0x5EED)
  lr = fns.local_lr(state.round)
  if ids is None:
    ids = jnp.arange(train.num_clients)
    real = ids < (spec.num_clients or train.num_clients)
  else:
    real = ids >= 0
    ids = jnp.maximum(ids, 0)

  def one_client(cdata, ctest, cstate, client_id, is_real, params):
    own = merge(params, cstate.get("personal", {}))
    if alg.eval_model is None:
      predict = lambda x: fns.problem.apply(own["model"], x)[0]
    else:
      trainer = make_trainer(cdata, jax.random.fold_in(key, client_id), lr, fns, spec)
      predict = alg.eval_model(own, cstate["alg"], trainer)

    def batch_counts(batch):
      x, y, mask = batch
      hit = jnp.argmax(predict(x), axis=-1) == y
      valid = mask.reshape(mask.shape + (1,) * (y.ndim - 1))
      if ignore_index is not None:
        valid = valid & (y != ignore_index)
      return jnp.sum(hit & valid), jnp.sum(valid)

    # Real examples come first, so only the leading batches hold any: the loop
    # runs those alone. Test splits are padded to the largest client's; a scan
    # over every batch took 2.1× as long (100 clients, the personalized preset).
    def add_batch(s, totals):
      hits, seen = batch_counts((ctest.x[s], ctest.y[s], ctest.mask[s]))
      return totals[0] + hits, totals[1] + seen

    batches = -(-ctest.num_examples // ctest.mask.shape[-1])  # ceil(n / B)
    zero = jnp.zeros((), jnp.int32)
    correct, count = lax.fori_loop(0, batches, add_batch, (zero, zero))
    return (jnp.where(is_real, correct, 0).astype(jnp.float32),
            jnp.where(is_real, count, 0).astype(jnp.float32))

  correct, count = map_clients(
      one_client, (train, test, state.client_states, ids, real), (state.params,),
      strategy=spec.parallelism, chunk_size=spec.chunk_size, mesh=spec.mesh)
  if spec.mesh is not None:  # replicated: every process of a multi-host job reads them back
    replicated = NamedSharding(spec.mesh, P())
    correct, count = (lax.with_sharding_constraint(a, replicated) for a in (correct, count))
  # The vectors too: the run keeps each client's accuracy (personal.jsonl), not
  # only the summary, and slicing them here would tie the jit to num_clients.
  return {**client_accuracy_stats(correct, count), "client_correct": correct,
          "client_examples": count}
