r"""The channel between clients and server — DP, attacks against robust rules, compressed
uplinks, stragglers — on real Fashion-MNIST with FedAvg and LeNet-5.

  python -m experiments.main --config=experiments/configs/channel.py:robust \
      --config.fl.robust.rule=median --config.fl.robust.attack=sign_flip \
      --config.fl.robust.attacker_fraction=0.2 --workdir=runs/channel/median_flip20
  python -m experiments.main --config=experiments/configs/channel.py:dp \
      --config.fl.dp.enabled=True --config.fl.dp.noise_multiplier=1.0 --workdir=runs/channel/dp1
  python -m experiments.sweep --sweep=experiments/sweeps/channel.py --workdir=runs/channel

The argument names the study (one of them):

* ``robust``, ``compression``, ``stragglers``: 100 clients on a Dirichlet(0.5)
  label split, 10 sampled per round, 1 local epoch of SGD (lr 0.05, momentum
  0.9, batch 32), 50 rounds (every example seen about 5 times).
* ``dp``: client-level DP needs many clients per round (the noise on the mean
  falls as 1/K̄), so 1,000 clients of 60 examples, 100 sampled per round
  (q = 0.1), 1 local epoch, 100 rounds (a round is a tenth of an epoch: 10
  passes over the data); the clip norm C = 0.5 is about the
  root-mean-square update norm of the first rounds without DP
  (``fl/client_drift`` = Σ w_i ‖Δ_i‖² ≈ 0.25–0.32 in rounds 1–3).

``local`` makes any of them a run of seconds on digits.
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

STUDIES = ("robust", "dp", "compression", "stragglers")
WORDS = (*STUDIES, "local")


def get_config(arg: str = "robust"):
  words = set(preset_words(arg, WORDS, required=[STUDIES]))
  c = default_config()
  c.mode = "fl"
  c.dataset.name = "fashion_mnist"
  c.dataset.standardize = False
  c.dataset.batch_size = 32
  c.dataset.eval_batch_size = 500
  c.model.name = "lenet5"
  c.isr.enabled = False
  c.fl.algorithm = "fedavg"
  c.fl.partition.method = "dirichlet"
  c.fl.partition.dirichlet_alpha = 0.5
  c.fl.num_clients = 100
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 1
  c.client_optimizer.update(dict(name="sgd", learning_rate=0.05, momentum=0.9))
  c.num_rounds = 50
  c.eval_every = 5
  c.checkpoint_every = 10
  c.logging.plots = False
  if "dp" in words:
    c.fl.num_clients = 1000
    c.fl.clients_per_round = 100
    c.fl.dp.clip_norm = 0.5
    c.num_rounds = 100
    c.eval_every = 10
    c.checkpoint_every = 20
  if "local" in words:
    c.dataset.name = "digits"
    c.dataset.batch_size = 16
    c.dataset.eval_batch_size = 64
    c.fl.num_clients = 20
    c.fl.clients_per_round = 10
    c.num_rounds = 3
    c.eval_every = 1
    c.checkpoint_every = 3
  return c
