"""FedIR (Hsu, Qi, Brown, ECCV 2020, "Federated Visual Classification with
Real-World Data Distribution"): importance reweighting of the local loss.

Client ``k`` optimises its objective with each example's loss weighted by
``p(y)/q_k(y)``: ``p`` the label distribution of all clients together (the
target distribution), ``q_k`` the client's own. The expected weighted local
loss then estimates the loss under ``p``, whatever the client's label skew.
The server averages as FedAvg. The weights enter the ordinary client objective
through ``Batch.weight`` (every ISR term is weighted the same way; the loss is
still divided by the number of real examples). When every client's label
distribution equals the global one, every weight is exactly 1: FedAvg.

Dense labels (segmentation, labels ``[B, H, W]``; not in the paper, which is
classification only): the unit is the pixel. ``p`` is the class distribution
of every client's valid pixels, ``q_k`` that of client ``k``'s, and every
pixel's loss is weighted by ``p(y)/q_k(y)`` of its own label (a weight with the
labels' shape; :mod:`isr_jax.losses` applies it per pixel to the CE and MI
terms and uses each image's mean weight for terms at another resolution). A
valid pixel has a label in ``[0, K)`` and belongs to a real example; a pixel
with any other label (the ignore label 255) counts in no distribution and gets
weight 0 (the objective leaves it out anyway). The expected weighted pixel loss
is then the pixel loss under ``p``.

The weights are unbounded: a class with one example on a client whose other
examples are mostly another class weighs ``p(y)·|D_k|`` — up to 18 on the
digits comparison (20 clients, Dirichlet 0.3, batch 16), a single example
outweighing the rest of its batch. The expected loss is the intended one, but
single steps get a high variance; experiments/RESULTS.md at commit cc57a03 measures what that
costs.

Assumptions: ``p`` is computed once by the server from every client's labels
(the paper assumes the population distribution is known or shared);
``num_classes`` is read from the output layer, the last axis of
``params["model"]["head"]["kernel"]`` (``[D, K]`` dense, ``[1, 1, C, K]`` for a
1x1-conv head). A class a client does not have gets weight 0 (it never occurs
in that client's batches).
"""

from __future__ import annotations

import jax.numpy as jnp

from isr_jax.fl.algorithm import FLAlgorithm, loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import label_counts, position_weights


def num_classes_of(params) -> int:
  return int(params["model"]["head"]["kernel"].shape[-1])


def init_server_state(params, data):
  """``p(y)`` over every client's real examples (valid pixels for dense labels)."""
  counts = label_counts(data.y, data.mask, num_classes_of(params))
  return {"p": counts / jnp.maximum(jnp.sum(counts), 1.0)}


def client_init(broadcast, client_state, client_data):
  """Per-class weights ``p(y)/q_k(y)`` (0 for classes the client lacks)."""
  del client_state
  p = broadcast.alg_state["p"]
  counts = label_counts(client_data.y, client_data.mask, p.shape[0])
  q = counts / jnp.maximum(jnp.sum(counts), 1.0)
  return {"class_weight": jnp.where(q > 0, p / jnp.where(q > 0, q, 1.0), 0.0)}


def client_grad(params, ctx, batch, problem, key):
  del key
  weight = position_weights(ctx["class_weight"], batch.y, batch.mask)
  if batch.weight is not None:
    other = batch.weight
    if other.ndim < weight.ndim:  # per-example weights over dense labels
      other = other.reshape(other.shape + (1,) * (weight.ndim - other.ndim))
    weight = weight * other
  return loss_grad(params, batch._replace(weight=weight), problem)


def fedir() -> FLAlgorithm:
  return fedavg()._replace(
      name="fedir", init_server_state=init_server_state, client_init=client_init,
      client_grad=client_grad)
