r"""FedSoL's main comparison (papers: FedSoL §4.1, App. C) on real Fashion-MNIST.

  python -m experiments.main --config=experiments/configs/fedsol.py:dir01 \
      --config.fl.algorithm=fedsol --workdir=runs/fedsol/dir01_fedsol
  python -m experiments.sweep --sweep=experiments/sweeps/fedsol.py --workdir=runs/fedsol

FedSoL's learning setup (App. C.4, Table 3): 100 clients, 10 % sampled per
round, 5 local epochs of momentum SGD (lr 0.01, momentum 0.9, weight decay
1e-5, lr × 0.99 per round), KL proximal loss at temperature 3; the baselines'
hyper-parameters are the paper's picks (Table 4): FedProx μ = 1, FedNTD β = 1,
τ = 1, FedSAM ρ = 0.1, FedASAM ρ = 1.0, FedSoL ρ = 2.0. Label skews: LDA
``dir01`` (Dirichlet 0.1) and sharding ``s2`` (data sorted by label in 200
shards, 2 per client, so each client holds at most two classes: #C ≤ 2).

What differs, for the compute of a 2-core CPU: Fashion-MNIST (28×28×1) for
MNIST/CIFAR-10, LeNet-5 instead of McMahan's 2-conv CNN (the same shape —
two 5×5 convolutions with max-pooling, then fully connected layers — at 1/26
of its parameters: a local step ~10× cheaper), batch 50 (the paper gives none;
McMahan et al.'s B = 50), and 50 rounds instead of 200–300. ``local`` runs
for seconds on digits.
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

SKEWS = ("dir01", "s2")
WORDS = (*SKEWS, "local")


def apply_skew(c, skew: str) -> None:
  if skew == "dir01":
    c.fl.partition.method = "dirichlet"
    c.fl.partition.dirichlet_alpha = 0.1
  elif skew == "s2":
    c.fl.partition.method = "shards"
    c.fl.partition.shards_per_client = 2
  else:
    raise ValueError(f"label skew {skew!r} is not one of {list(SKEWS)}")


def get_config(arg: str = "dir01"):
  words = set(preset_words(arg, WORDS, exclusive=[SKEWS]))
  skews = words & set(SKEWS)
  c = default_config()
  c.mode = "fl"
  c.dataset.name = "fashion_mnist"
  c.dataset.standardize = False
  c.dataset.batch_size = 50
  c.dataset.eval_batch_size = 500
  c.model.name = "lenet5"
  c.fl.algorithm = "fedsol"
  c.fl.num_clients = 100
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 5
  apply_skew(c, next(iter(skews), "dir01"))
  c.client_optimizer.update(dict(name="sgd", learning_rate=0.01, momentum=0.9,
                                 weight_decay=1e-5, lr_decay=0.99))
  c.fl.fedprox.mu = 1.0
  c.fl.fedntd.beta, c.fl.fedntd.tau = 1.0, 1.0
  c.fl.fedsam.rho = 0.1
  c.fl.fedasam.rho = 1.0
  c.fl.fedsol.rho = 2.0
  c.fl.fedsol.tau = 3.0
  c.fl.fedsol.proximal = "kl"
  c.num_rounds = 50
  c.eval_every = 5
  c.checkpoint_every = 10
  c.logging.plots = False
  if "local" in words:
    c.dataset.name = "digits"
    c.dataset.batch_size = 16
    c.dataset.eval_batch_size = 64
    c.fl.num_clients = 10
    c.fl.clients_per_round = 5
    c.fl.local_epochs = 1
    c.num_rounds = 3
    c.eval_every = 1
    c.checkpoint_every = 3
  return c
