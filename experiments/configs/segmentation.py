r"""Semantic segmentation (OmniISR §4, Table III): model × dataset × {CL, FL} × ISR.

  python -m experiments.main --config=experiments/configs/segmentation.py:deeplabv3plus,fl,isr \
      --workdir=runs/seg_deeplab_fl_isr

Argument: comma-separated model (``deeplabv3plus``, ``topformer``, ``seaformer``),
mode (``cl``, ``fl``, ``hybrid``), optionally ``isr``, a dataset
(``synthetic_streets`` — the default, procedural and offline — ``cityscapes``,
``camvid``, ``synthia_sf``; the real ones need ``--config.dataset.data_dir``),
and ``local`` for a run of seconds. Images are resized to
``dataset.image_size`` (48×96 by default: sized so that the whole Table III grid
runs in under 20 minutes on 2 CPU cores; the paper trains at full resolution on
GPUs — set e.g. ``--config.dataset.image_size='(512, 1024)'``).
"""

from experiments.configs import preset_words
from isr_jax.config import default_config

MODELS = ("deeplabv3plus", "topformer", "seaformer")
DATASETS = ("synthetic_streets", "cityscapes", "camvid", "synthia_sf")
MODES = ("cl", "fl", "hybrid")
WORDS = (*MODELS, *MODES, *DATASETS, "isr", "local")


def get_config(arg: str = "deeplabv3plus,fl"):
  words = preset_words(arg, WORDS, exclusive=[MODELS, MODES, DATASETS])
  models = [w for w in words if w in MODELS]
  modes = [w for w in words if w in MODES]
  datasets = [w for w in words if w in DATASETS]
  c = default_config()
  c.mode = modes[0] if modes else "fl"
  c.model.name = models[0] if models else "deeplabv3plus"
  c.dataset.name = datasets[0] if datasets else "synthetic_streets"
  c.dataset.image_size = (48, 96)
  c.dataset.batch_size = 8
  c.dataset.eval_batch_size = 16
  if c.dataset.name == "synthetic_streets":
    c.dataset.options.num_train = 240
    c.dataset.options.num_test = 60
    c.dataset.options.num_cities = 6
  # CL: 10 epochs of 30 steps; FL: 30 rounds of 5 local steps on each of 6 clients
  # (each round sees 5/6 of an epoch). Measured: ~35 s per run on 2 CPU cores.
  c.num_rounds = 10 if c.mode == "cl" else 30
  c.eval_every = 5
  c.checkpoint_every = 10

  # FL: one client per city ("natural" non-IID), all of them every round.
  c.fl.num_clients = 6
  c.fl.clients_per_round = 6
  c.fl.local_steps = 5
  c.fl.partition.method = "natural"
  # The paper's optimizer (Adam 0.9/0.999, weight decay 1e-4) in CL; clients use it too.
  c.cl_optimizer.learning_rate = 1e-3
  c.client_optimizer = c.cl_optimizer.copy_and_resolve_references()

  c.isr.enabled = "isr" in words
  c.isr.num_taps = 2
  c.isr.spacing = 2
  c.isr.placement = "input"
  c.isr.mi_weight = 0.1
  c.isr.ne_weight = 0.01
  if "local" in words:
    c.num_rounds = 2
    c.eval_every = 1
    if c.dataset.name == "synthetic_streets":
      c.dataset.options.num_train = 96
      c.dataset.options.num_test = 24
    c.fl.local_steps = 2
  return c
