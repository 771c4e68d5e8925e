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
from isr_jax.fl.file_store import FileStateStore
from isr_jax.fl.population import PopulationRound, evaluate_population, initial_rows
from isr_jax.fl.registry import ALGORITHMS, make_algorithm
from isr_jax.fl.round import (
    FederatedRound,
    federated_update,
    fl_round,
    init_client_states,
    make_round,
)
from isr_jax.fl.selection import ClientRows
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.state_store import ClientStateStore, HostStateStore

__all__ = [
    "ALGORITHMS",
    "CLIENT_PARALLELISM",
    "Batch",
    "ClientRows",
    "ClientStateStore",
    "FLAlgorithm",
    "FLSpec",
    "FederatedRound",
    "FileStateStore",
    "HostStateStore",
    "LocalProblem",
    "PopulationRound",
    "RoundFns",
    "ServerBroadcast",
    "batch_schedule",
    "evaluate_population",
    "federated_update",
    "fl_round",
    "init_client_states",
    "initial_rows",
    "loss_grad",
    "make_algorithm",
    "make_round",
    "map_clients",
    "run_local_steps",
    "weighted_sum",
]
