r"""Does ISR shrink the CL–FL gap? LeNet-5 on real Fashion-MNIST, CL against FL.

  python -m experiments.main --config=experiments/configs/isr_gap.py:fl,c2 \
      --config.isr.enabled=True --workdir=runs/isr_gap/fl_c2_isr
  python -m experiments.main --config=experiments/configs/isr_gap.py:cl --workdir=runs/isr_gap/cl
  python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py --workdir=runs/isr_gap

The setting of experiments/RESULTS.md's ISR section (OmniISR §4.2's question on
a dataset available offline): LeNet-5 (``isr_jax.models.cnn.LeNet5``), inputs
in [0, 1], batch 32.

* FL: 100 clients, 10 sampled per round, 1 local epoch of SGD (lr 0.01, momentum
  0.9: NIID-Bench's; at lr 0.05 #C = 2 was at chance after 10 rounds), 100
  rounds: every example is seen about 10 times;
* CL: Adam (lr 1e-3, weight decay 1e-4: OmniISR §4.1), 10 epochs, the same 10
  passes over the data;
* ISR (when ``isr.enabled``): the library's default taps for LeNet-5 — 2
  input-biased taps with 2-base spacing (``conv1``, ``conv2``) — with α = 0.1,
  λ = 0.01.

The argument is a comma-separated list: the mode (``cl`` or ``fl``), for FL the
label skew (``iid``, ``dir01`` = Dirichlet 0.1, ``c2`` = two classes per
client; default ``c2``), and ``local`` for a run of seconds (digits, 3 rounds).
Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist``.
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

# Label-skew word -> the partition settings it stands for (also the sweep's skew axis).
SKEW_SETTINGS = {
    "iid": {"fl.partition.method": "iid"},
    "dir01": {"fl.partition.method": "dirichlet", "fl.partition.dirichlet_alpha": 0.1},
    "c2": {"fl.partition.method": "pathological", "fl.partition.classes_per_client": 2},
}
SKEWS = tuple(SKEW_SETTINGS)
MODES = ("cl", "fl")
WORDS = (*MODES, *SKEWS, "local")


def apply_skew(c, skew: str) -> None:
  """Sets ``c.fl.partition`` from a label-skew word."""
  if skew not in SKEW_SETTINGS:
    raise ValueError(f"label skew {skew!r} is not one of {list(SKEWS)}")
  for setting, value in SKEW_SETTINGS[skew].items():
    c.fl.partition[setting.rsplit(".", 1)[1]] = value


def get_config(arg: str = "fl,c2"):
  words = set(preset_words(arg, WORDS, required=[MODES], exclusive=[SKEWS]))
  modes = words & set(MODES)
  skews = words & set(SKEWS)
  c = default_config()
  c.mode = modes.pop()
  c.dataset.name = "fashion_mnist"
  c.dataset.standardize = False
  c.dataset.batch_size = 32
  c.dataset.eval_batch_size = 500
  c.model.name = "lenet5"

  c.fl.num_clients = 100
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 1
  apply_skew(c, next(iter(skews), "c2"))
  c.client_optimizer.learning_rate = 0.01
  c.client_optimizer.momentum = 0.9
  c.cl_optimizer.learning_rate = 1e-3
  c.cl_optimizer.weight_decay = 1e-4

  c.isr.enabled = False
  c.isr.num_taps = 2
  c.isr.spacing = 2
  c.isr.placement = "input"
  c.isr.mi_weight = 0.1
  c.isr.ne_weight = 0.01

  c.num_rounds = 10 if c.mode == "cl" else 100
  c.eval_every = 1 if c.mode == "cl" else 10
  c.checkpoint_every = 5 if c.mode == "cl" else 20
  c.logging.plots = False  # a grid of runs: the sweep's report draws the figures
  if "local" in words:
    c.dataset.name = "digits"
    c.dataset.batch_size = 16
    c.dataset.eval_batch_size = 64
    c.fl.num_clients = 10
    c.fl.clients_per_round = 5
    c.num_rounds = 3
    c.eval_every = 1
    c.checkpoint_every = 3
  return c
