"""Federated rounds and the algorithms that plug into them."""

from isr_jax.fl.algorithm import (
    Batch,
    FLAlgorithm,
    LocalProblem,
    ServerBroadcast,
    loss_grad,
    weighted_sum,
)
from isr_jax.fl.client import CLIENT_PARALLELISM, batch_schedule, map_clients, run_local_steps
from isr_jax.fl.registry import ALGORITHMS, make_algorithm
from isr_jax.fl.round import (
    FederatedRound,
    federated_update,
    fl_round,
    init_client_states,
    make_round,
)
from isr_jax.fl.spec import FLSpec, RoundFns

__all__ = [
    "ALGORITHMS",
    "CLIENT_PARALLELISM",
    "Batch",
    "FLAlgorithm",
    "FLSpec",
    "FederatedRound",
    "LocalProblem",
    "RoundFns",
    "ServerBroadcast",
    "batch_schedule",
    "federated_update",
    "fl_round",
    "init_client_states",
    "loss_grad",
    "make_algorithm",
    "make_round",
    "map_clients",
    "run_local_steps",
    "weighted_sum",
]
