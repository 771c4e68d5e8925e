r"""The cross-silo Fashion-MNIST benchmark of the non-IID FL literature.

The setting of Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An
Experimental Study" (ICDE 2022, "NIID-Bench"), also used by FedNova, MOON and
later label-skew studies: 10 parties, all sampled every round, 10 local
epochs, batch 64, SGD lr 0.01 momentum 0.9 weight decay 1e-5, the small
2-conv CNN (conv 5×5×6 → pool → conv 5×5×16 → pool → fc 120 → fc 84 → 10,
i.e. :class:`isr_jax.models.cnn.LeNet5`, 61,706 parameters at 28×28), inputs
scaled to [0, 1], 50 rounds. Real Fashion-MNIST from the Debian package
(``apt-get install dataset-fashion-mnist``).

  python -m experiments.main --config=experiments/configs/cross_silo.py:dirichlet \
      --config.fl.algorithm=fedprox --workdir=runs/cross_silo/dir05_fedprox
  python -m experiments.main --config=experiments/configs/cross_silo.py:classes2 \
      --workdir=runs/cross_silo/c2_fedavg

The argument names the label skew: ``dirichlet`` (p_k ~ Dir(0.5) per class) or
``classes2`` ("#C = 2": every party holds two classes, each class split evenly
among the parties that hold it); append ``,local`` for a run of seconds.
FedProx's μ is 0.01, the best of NIID-Bench's grid {0.001, 0.01, 0.1, 1}.
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

SKEWS = ("dirichlet", "classes2")
WORDS = (*SKEWS, "local")


def get_config(arg: str = "dirichlet"):
  words = set(preset_words(arg, WORDS, required=[SKEWS]))
  skews = words & set(SKEWS)
  c = default_config()
  c.mode = "fl"
  c.dataset.name = "fashion_mnist"
  c.dataset.standardize = False  # [0, 1], as in the benchmark
  c.dataset.batch_size = 64
  c.dataset.eval_batch_size = 500
  c.model.name = "lenet5"

  c.fl.num_clients = 10
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 10
  if skews.pop() == "dirichlet":
    c.fl.partition.method = "dirichlet"
    c.fl.partition.dirichlet_alpha = 0.5
  else:
    c.fl.partition.method = "pathological"
    c.fl.partition.classes_per_client = 2
  c.client_optimizer.learning_rate = 0.01
  c.client_optimizer.momentum = 0.9
  c.client_optimizer.weight_decay = 1e-5
  c.fl.fedprox.mu = 0.01

  c.num_rounds = 50
  c.eval_every = 1
  c.checkpoint_every = 1  # a round takes tens of seconds; a resume loses none
  if "local" in words:
    c.fl.local_epochs = 1
    c.num_rounds = 2
  return c
