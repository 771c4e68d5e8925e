"""Local: every client trains its own model on its own data; nothing is shared.

The "Local" baseline of personalized FL (FedAIMS paper §5.1: "each client
trains its model independently with its local dataset"; 0 MB per round in its
Table 6; PFLlib's ``local``). Client ``i``'s model ``θ_i`` is its personal state
(``personal = "all"``: the model and the ISR adapters), and a round is, for
each sampled client, the round's local epochs of SGD on ``L_T`` from its own
``θ_i``:

``θ_i ← θ_i − η ∇L_T^i(θ_i)``  (repeated over the client's batches),

exactly FedAvg's local update started from the client's model instead of a
global one. Sampling still decides who trains in a round, so with the same
``clients_per_round`` Local does the same local work as the federated methods.

Nothing travels: the message and the downlink are empty (0 bytes both ways),
the pseudo-gradient is zero and the server optimizer is ``set_to_zero``, so the
global parameters never change whatever ``fl.server_optimizer`` says (its
weight decay included); they are only the clients' common initialisation.
Personalized evaluation reads each client's own ``θ_i``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg


def client_final(broadcast, ctx, local_params, num_steps, client_state):
  """Nothing goes up; the round keeps ``local_params`` as the client's model."""
  del broadcast, ctx, local_params, num_steps
  return {}, client_state


def server_update(params, alg_state, messages, weights):
  del messages, weights
  return jax.tree.map(jnp.zeros_like, params), alg_state


def local() -> FLAlgorithm:
  return fedavg()._replace(
      name="local", client_final=client_final, server_update=server_update,
      server_optimizer=optax.set_to_zero(), downlink=lambda broadcast: {}, personal="all",
      mean_messages=False)
