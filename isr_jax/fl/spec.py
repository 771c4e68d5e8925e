"""What a federated round is built from: its static settings and its pieces."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import optax
from jax.sharding import Mesh

from isr_jax.fl.algorithm import FLAlgorithm, LocalProblem
from isr_jax.fl.channel.spec import ChannelSpec


class FLSpec(NamedTuple):
  """Static settings of a federated round.

  Attributes:
    clients_per_round: clients sampled (without replacement) each round.
    local_epochs: local epochs E (when ``local_steps == 0``).
    local_steps: fixed local steps per client (0 = epochs mode).
    parallelism: ``auto``, ``vmap``, ``chunked`` or ``sequential``.
    chunk_size: clients per chunk for ``chunked``.
    aggregate_adapters: average the ISR adapters (methods §2); else they are personal.
    unroll: ``lax.scan`` unroll of the local steps.
    num_clients: clients to sample from (0 = every row of the data). Rows past it
      are padding added to fill the mesh.
    mesh: shard the sampled clients over this mesh's ``clients`` axis; their
      number is padded up to a multiple of its size with empty clients.
    measure_heterogeneity: also report ``fl/heterogeneity``, the gradient
      dissimilarity ``H_t`` of OmniISR Eq. 13 (one extra gradient per client).
    channel: what happens to the messages between the clients and the server
      (DP, robust rules and attacks, compression, stragglers); all off by default.
  """

  clients_per_round: int
  local_epochs: int = 1
  local_steps: int = 0
  parallelism: str = "auto"
  chunk_size: int = 0
  aggregate_adapters: bool = True
  unroll: int = 1
  num_clients: int = 0
  mesh: Mesh | None = None
  measure_heterogeneity: bool = False
  channel: ChannelSpec = ChannelSpec()


class RoundFns(NamedTuple):
  """The pieces a round is built from (static under jit)."""

  algorithm: FLAlgorithm
  problem: LocalProblem
  local_optimizer: optax.GradientTransformation
  local_lr: Callable[[jax.Array], jax.Array]
  server_optimizer: optax.GradientTransformation
