"""All training state in one pytree, so it jits, donates, checkpoints and resumes."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class TrainState(NamedTuple):
  """The whole state of a run, in every mode.

  Attributes:
    params: ``{"model": ..., "adapters": ...}`` — the global model θ and the ISR
      adapters Φ (``{}`` when ISR is off).
    opt_state: state of the optimizer that writes ``params``: the CL optimizer in
      CL mode, the server optimizer in FL and hybrid mode.
    alg_state: the FL algorithm's server state (``{}`` for FedAvg and in CL).
    client_states: per-client persistent state stacked on a leading client axis:
      ``{"alg": the algorithm's client state, "personal": the leaves that stay
      on the clients}`` (``personal`` only when there are any: a personalized
      algorithm's model part, or the ISR adapters when
      ``isr.aggregate_adapters=False``; see :func:`isr_jax.fl.round.init_client_states`).
    rng: base PRNG key (raw uint32[2]); round ``t`` uses ``fold_in(rng, t)``.
    round: number of completed rounds (int32 scalar).
    mix_weight: hybrid mixing weight α_t for the next round (float32 scalar).
    channel_state: the server's state of the channel between clients and server
      (DP's adaptive clipping norm; ``{}`` when no part keeps one, see
      :mod:`isr_jax.fl.channel`).
  """

  params: Any
  opt_state: Any
  alg_state: Any
  client_states: Any
  rng: jax.Array
  round: jax.Array
  mix_weight: jax.Array
  channel_state: Any = {}
