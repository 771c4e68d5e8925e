"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency, 2020).

"Think Locally, Act Globally: Federated Learning with Local and Global
Representations" (arXiv:2001.01523), Algorithm 1: each client keeps a *local*
representation model ℓ_m (here the body, every model leaf outside the head) and
all clients share a *global* model g on top of it (here the head). A sampled
client trains both on its own data from its own ℓ_m and the global g; only g
goes up, and the server averages ``g ← Σ_m w_m g_m``. It is FedPer's split
turned round: FedAIMS §5.1, "aggregate only the head"; its Table 6 counts
``(1 − β) Σ`` each way.

Here ``personal = "body"``: the round keeps each client's body in its state and
only the head travels; local training and aggregation are FedAvg's. The ISR
adapters follow ``isr.aggregate_adapters`` (averaged by default, as the
shared part of the objective); with ``False`` they stay home with the body.

Not reproduced: the authors' code (pliang279/LG-FedAvg, ``main_lg.py``) starts
every client from a FedAvg-pretrained model; PFLlib and FedAIMS start from the
common random initialisation, as here. No hyper-parameter.
"""

from __future__ import annotations

from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import require_head


def lg_fedavg() -> FLAlgorithm:
  return fedavg()._replace(
      name="lg_fedavg", init_server_state=require_head("lg_fedavg"), personal="body")
