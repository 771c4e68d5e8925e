r"""scikit-learn digits (8×8, ships with scikit-learn): CL, FL or hybrid, ± ISR.

  python -m experiments.main --config=experiments/configs/digits.py:fl,isr \
      --workdir=runs/digits_fl_isr

The argument is a comma-separated list: one mode (``cl``, ``fl``, ``hybrid``),
optionally ``isr`` to switch ISR on and ``local`` for a run of a few seconds.
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

MODES = ("cl", "fl", "hybrid")
WORDS = (*MODES, "isr", "local")


def get_config(arg: str = "fl"):
  words = set(preset_words(arg, WORDS, required=[MODES]))
  modes = words & set(MODES)
  c = default_config()
  c.mode = modes.pop()
  c.dataset.name = "digits"
  c.dataset.batch_size = 16
  c.model.name = "fedavg_cnn"
  c.num_rounds = 60
  c.eval_every = 5
  c.checkpoint_every = 20

  c.fl.num_clients = 20
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 1
  c.fl.partition.method = "dirichlet"
  c.fl.partition.dirichlet_alpha = 0.3
  c.client_optimizer.learning_rate = 0.05
  c.client_optimizer.momentum = 0.9
  c.cl_optimizer.learning_rate = 1e-3

  c.hybrid.schedule = "fixed"
  c.hybrid.mix_weight = 0.5
  c.hybrid.cloud_fraction = 0.1
  c.hybrid.cloud_steps = 5

  c.isr.enabled = "isr" in words
  c.isr.num_taps = 2
  c.isr.spacing = 2
  c.isr.placement = "input"
  c.isr.mi_weight = 0.1
  c.isr.ne_weight = 0.01
  if "local" in words:
    c.num_rounds = 4
    c.eval_every = 2
    c.checkpoint_every = 2
  return c
