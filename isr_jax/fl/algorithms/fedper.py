"""FedPer (Arivazhagan, Aggarwal, Singh, Choudhary, arXiv:1912.00818, 2019).

"Federated Learning with Personalization Layers": the network is a shared base
(here the body φ, every model leaf outside ``params["model"]["head"]``) and
personalization layers kept on each client (here the head ψ_i, the model's
output layer). Each sampled client trains the whole network on its own data,
starting from the global body and its own head (Algorithm 1, client update:
``(W_B, W_P_j) ← SGD on the client's loss``), sends only the body back, and the
server averages the bodies FedAvg-style (Algorithm 1, server:
``W_B ← Σ_j (n_j/n) W_B_j``). FedAIMS §5.1: "aggregate only the backbone while
jointly updating the personalized head and global backbone"; uplink and
downlink ``β Σ`` each (its Table 6).

Here ``personal = "head"``: the round keeps ψ_i in the client state, starts the
client from ``merge(φ_t, ψ_i)``, writes the trained ψ_i back and never lets it
reach the server (:mod:`isr_jax.fl.personal`); local training and aggregation
are FedAvg's. The paper's "top K_P layers" become the model's head (the layer
split every model of the library names), as PFLlib and FedAIMS use it. The ISR
adapters belong to the shared part and are averaged unless
``isr.aggregate_adapters=False``. No hyper-parameter.
"""

from __future__ import annotations

from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import require_head


def fedper() -> FLAlgorithm:
  return fedavg()._replace(
      name="fedper", init_server_state=require_head("fedper"), personal="head")
