"""FedAvg (McMahan et al., AISTATS 2017, Algorithm 1).

Clients run local SGD on their own objective from the global model; the server
sets ``θ_{t+1} = Σ_n (|D_n| / Σ_k |D_k|) θ_n``. As a pseudo-gradient:
``θ_t − θ̃_{t+1} = −Σ_n w_n (θ_n − θ_t)`` (OmniISR Algorithm 1, FL branch).
"""

from __future__ import annotations

import jax

from isr_jax.fl.algorithm import (
    FLAlgorithm,
    loss_grad,
    no_context,
    no_state,
    weighted_sum,
)


def client_grad(params, ctx, batch, problem, key):
  del ctx, key
  return loss_grad(params, batch, problem)


def client_final(broadcast, ctx, local_params, num_steps, client_state):
  """Uploads the model delta ``θ_n − θ_t``."""
  del ctx, num_steps
  delta = jax.tree.map(lambda a, b: a - b, local_params, broadcast.params)
  return {"delta": delta}, client_state


def server_update(params, alg_state, messages, weights):
  del params
  pseudo_grad = jax.tree.map(lambda d: -d, weighted_sum(messages["delta"], weights))
  return pseudo_grad, alg_state


def fedavg() -> FLAlgorithm:
  return FLAlgorithm(
      name="fedavg", init_server_state=no_state, init_client_state=no_state,
      client_init=no_context, client_grad=client_grad, client_final=client_final,
      server_update=server_update, mean_messages=True)
