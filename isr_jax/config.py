"""Default settings and their validation.

Experiment files under ``experiments/configs/`` start from
:func:`default_config` and override what they need. :func:`validate` checks
everything that can be checked before data is loaded, with one-line errors
that name the setting and the allowed values; the rest (taps against the model,
partitions against the data) is checked where that information exists.
"""

from __future__ import annotations

import json

import ml_collections
from ml_collections import config_dict

from isr_jax.config_checks import check_number, check_one_of
from isr_jax.config_names import check_no_old_names, current_names
from isr_jax.data import DATASETS, PARTITION_METHODS, SEGMENTATION_DATASETS
from isr_jax.errors import ConfigError
from isr_jax.fl.channel import channel_defaults, channel_spec
from isr_jax.fl.channel.spec import check_algorithm
from isr_jax.fl.client import CLIENT_PARALLELISM
from isr_jax.fl.placement import DEFAULTS as population_defaults
from isr_jax.fl.placement import settings as population_settings
from isr_jax.fl.registry import (
  ALGORITHMS,
  algorithm_defaults,
  algorithm_sections_read,
  check_algorithm_settings,
  check_unused_algorithm_settings,
)
from isr_jax.hybrid import ADAPTIVE_RULES, SCHEDULES
from isr_jax.models import MODELS
from isr_jax.nn.lowering import CONV_IMPLS
from isr_jax.optim import make_optimizer
from isr_jax.taps import PLACEMENTS

MODES = ("cl", "fl", "hybrid")

# Settings a resumed run may change: they decide how long to train and what to
# log or keep, never what a round computes, so the resumed run is still the run
# its checkpoints and metrics.jsonl describe. Every other difference from the
# workdir's config.json stops the resume (see :func:`resume_changes`).
# num_rounds may go either way: at or below the saved round the run is finished.
RESUME_SAFE_SETTINGS = frozenset({
    "num_rounds",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "dataset.data_dir",  # where the same data is read from
    # Where the clients live, not what a round computes; a resume keeps the placement
    # of its checkpoints (isr_jax.fl.placement.placement_for_resume).
    "fl.population.placement",
    "fl.population.dense_limit_gib",
    "fl.population.eval_chunk",
    "fl.population.cache_mib",
})
# Whole sections that change what a run reports, never what it computes.
RESUME_SAFE_SECTIONS = ("logging.",)
# Settings added after runs were already saved, with the value that reproduces
# what such a run computed: a config.json without them is compared as if it held
# these. (Settings added to another algorithm's ``fl.<algorithm>`` section need no
# entry: the saved run never read them.)
SETTINGS_ADDED_LATER = {
    "fl.scaffold.momentum_correction": "full",  # the literal step, SCAFFOLD's only one before
    "fl.personalized_eval": "auto",  # off for every algorithm that existed then
    "fl.client_test_fraction": 0.25,  # read only when personalized_eval is on
    "isr.decouple_adapters": False,  # adapters' updates were scaled by mi_weight before
    "fl.fedaims.absent_classes": "zero",  # a class with no global prototype was pulled to σ(0)
    "fl.fedaims_full.absent_classes": "zero",
    # The channel (DP, robust rules and attacks, compression, stragglers): all off.
    **{f"fl.{section}.{name}": value for section, defaults in channel_defaults().items()
       for name, value in defaults.items()},
    # Where the clients live (resume-safe: the checkpoints say where they were).
    **{f"fl.population.{name}": value for name, value in population_defaults.items()},
}

_MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's limit on a seed


def default_config() -> ml_collections.ConfigDict:
  """Every setting with its default (FedAvg on digits, ISR off)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "fl"
  c.num_rounds = 50
  c.eval_every = 5
  c.checkpoint_every = 10
  c.keep_checkpoints = 2
  # What a run reports besides metrics.jsonl; none of it changes the training.
  c.logging = ml_collections.ConfigDict(dict(
      progress=True,  # phases and "round k/N" with rate and ETA (isr_jax logger, INFO)
      tensorboard=True,  # TensorBoard events in the workdir (tensorboardX, no TensorFlow)
      plots=True,  # <workdir>/learning_curves.png at the end of the run
      verbose=False,  # also every round's metrics on the console (always in metrics.jsonl)
  ))

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"
  c.dataset.data_dir = config_dict.placeholder(str)
  c.dataset.test_fraction = 0.2
  c.dataset.standardize = False
  c.dataset.batch_size = 32
  c.dataset.eval_batch_size = 256
  # Segmentation: (H, W) to resize to, and dataset-specific options (e.g. num_cities).
  c.dataset.image_size = config_dict.placeholder(tuple)
  c.dataset.options = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "fedavg_cnn"
  c.model.conv_impl = "auto"
  c.model.options = ml_collections.ConfigDict()

  c.isr = ml_collections.ConfigDict()
  c.isr.enabled = False
  c.isr.taps = ()
  c.isr.num_taps = 0  # 0 = default M = O(log depth)
  c.isr.spacing = 1
  c.isr.placement = "input"
  c.isr.mi_weight = 0.1  # MI weight α_m: one value or one per tap
  c.isr.ne_weight = 0.01  # NE weight λ_m: one value or one per tap
  c.isr.ne_normalize = False
  # The adapters learn at their own rate: mi_weight scales only the MI term's
  # gradient into the backbone (isr_jax.losses.isr_loss). False: Eq. 5 taken
  # literally, the adapters' updates scaled by mi_weight as well.
  c.isr.decouple_adapters = True
  c.isr.aggregate_adapters = True

  # The optimizer of CL mode (paper: Adam, weight decay 1e-4).
  c.cl_optimizer = ml_collections.ConfigDict(
      dict(name="adam", learning_rate=1e-3, weight_decay=1e-4, b1=0.9, b2=0.999, eps=1e-8,
           lr_decay=1.0))
  # The clients' local optimizer; also the cloud side of hybrid mode (η_t).
  c.client_optimizer = ml_collections.ConfigDict(
      dict(name="sgd", learning_rate=0.05, momentum=0.0, nesterov=False, weight_decay=0.0,
           lr_decay=1.0))

  c.fl = ml_collections.ConfigDict()
  c.fl.algorithm = "fedavg"
  c.fl.num_clients = 20
  c.fl.clients_per_round = 10
  c.fl.local_epochs = 1
  c.fl.local_steps = 0  # > 0: fixed local steps instead of epochs
  c.fl.client_parallelism = "auto"  # or vmap / chunked / sequential (fl.client.auto_parallelism)
  c.fl.chunk_size = 0
  c.fl.num_devices = 0  # 0 = every device; sampled clients are sharded over them
  c.fl.measure_heterogeneity = False  # log H_t (OmniISR Eq. 13): one extra grad per client
  c.fl.unroll = 1
  # Personalized-FL protocol (methods §4): every client's own model on a held-out part
  # of its own data. "auto": on for the personalized algorithms (FedAIMS, FedPer, ...).
  # The held-out splits are batched by min(dataset.batch_size, eval_batch_size).
  c.fl.personalized_eval = "auto"
  c.fl.client_test_fraction = 0.25
  c.fl.partition = ml_collections.ConfigDict(
      dict(method="dirichlet", dirichlet_alpha=0.3, shards_per_client=2, classes_per_client=2))
  # Each algorithm's hyper-parameters: config.fl.<name>.<setting>.
  for name, defaults in algorithm_defaults().items():
    c.fl[name] = defaults
  # Between the clients and the server (isr_jax.fl.channel): config.fl.dp, .robust,
  # .compression, .stragglers; every part off by default.
  for name, defaults in channel_defaults().items():
    c.fl[name] = defaults
  # Where the client population lives: on the devices, or on the host with each
  # round's clients gathered (isr_jax.fl.placement, isr_jax.fl.population).
  c.fl.population = ml_collections.ConfigDict(dict(population_defaults))
  # Fed the pseudo-gradient θ_t − θ̃; SGD at rate 1 is FedAvg.
  c.fl.server_optimizer = ml_collections.ConfigDict(
      dict(name="sgd", learning_rate=1.0, momentum=0.0, nesterov=False, weight_decay=0.0))

  c.hybrid = ml_collections.ConfigDict()
  c.hybrid.schedule = "fixed"
  c.hybrid.mix_weight = 0.5  # α_0 of OmniISR Eq. 9: the cloud gradient's weight
  c.hybrid.beta = 0.1
  c.hybrid.mix_weight_min = 0.05
  c.hybrid.adaptive_rule = "paper"
  c.hybrid.cloud_steps = 1
  c.hybrid.cloud_fraction = 0.1
  return c


def _positive_int(value, setting: str, minimum: int = 1):
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ConfigError(f"{setting}={value!r} must be an integer >= {minimum}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises :class:`ConfigError` (one line) on the first invalid setting.

  Every algorithm's section is range-checked, also those the run does not read.
  """
  check_no_old_names(config)
  check_one_of(config.mode, MODES, "mode")
  check_one_of(config.dataset.name.split("/")[0] if config.dataset.name.startswith("emnist/")
          else config.dataset.name, DATASETS, "dataset.name")
  check_one_of(config.model.name, MODELS, "model.name")
  check_one_of(config.model.conv_impl, CONV_IMPLS, "model.conv_impl")
  _check_task(config.model.name, config.dataset.name)
  if config.dataset.get("image_size") and config.dataset.name not in SEGMENTATION_DATASETS:
    raise ConfigError(
        f"dataset.image_size={tuple(config.dataset.image_size)} is read only by segmentation "
        f"datasets ({', '.join(sorted(SEGMENTATION_DATASETS))}); dataset.name="
        f"{config.dataset.name!r} keeps its images' size: leave it unset")
  if (not isinstance(config.seed, int) or isinstance(config.seed, bool)
      or not 0 <= config.seed <= _MAX_SEED):
    raise ConfigError(f"seed={config.seed!r} must be an integer in [0, {_MAX_SEED}]")
  _positive_int(config.num_rounds, "num_rounds")
  _positive_int(config.eval_every, "eval_every")
  _positive_int(config.checkpoint_every, "checkpoint_every")
  _positive_int(config.keep_checkpoints, "keep_checkpoints")
  _positive_int(config.dataset.batch_size, "dataset.batch_size")
  _positive_int(config.dataset.eval_batch_size, "dataset.eval_batch_size")
  check_number(config.dataset.test_fraction, "dataset.test_fraction", low=0, high=1,
                low_open=True, high_open=True)

  isr = config.isr
  check_one_of(isr.placement, PLACEMENTS, "isr.placement")
  _positive_int(isr.spacing, "isr.spacing")
  _positive_int(isr.num_taps, "isr.num_taps", minimum=0)
  for name in ("decouple_adapters", "aggregate_adapters", "ne_normalize", "enabled"):
    if not isinstance(isr[name], bool):
      raise ConfigError(f"isr.{name}={isr[name]!r} must be True or False")
  for name in ("mi_weight", "ne_weight"):
    values = isr[name] if isinstance(isr[name], (tuple, list)) else (isr[name],)
    for v in values:
      check_number(v, f"isr.{name}", low=0)

  make_optimizer(config.cl_optimizer, setting="cl_optimizer")
  make_optimizer(config.client_optimizer, setting="client_optimizer")
  make_optimizer(config.fl.server_optimizer, setting="fl.server_optimizer")
  for name in ("cl_optimizer", "client_optimizer"):
    check_number(config[name].get("lr_decay", 1.0), f"{name}.lr_decay", low=0, low_open=True,
                 high=1)

  fl = config.fl
  check_one_of(fl.algorithm, ALGORITHMS, "fl.algorithm")
  check_algorithm_settings(config)
  check_unused_algorithm_settings(config)
  _positive_int(fl.num_clients, "fl.num_clients")
  _positive_int(fl.clients_per_round, "fl.clients_per_round")
  if fl.clients_per_round > fl.num_clients:
    raise ConfigError(
        f"fl.clients_per_round={fl.clients_per_round} exceeds fl.num_clients={fl.num_clients}")
  _positive_int(fl.local_epochs, "fl.local_epochs")
  _positive_int(fl.local_steps, "fl.local_steps", minimum=0)
  check_one_of(fl.client_parallelism, CLIENT_PARALLELISM, "fl.client_parallelism")
  _positive_int(fl.chunk_size, "fl.chunk_size", minimum=0)
  _positive_int(fl.num_devices, "fl.num_devices", minimum=0)
  if fl.client_parallelism == "chunked" and fl.chunk_size < 1:
    raise ConfigError("fl.chunk_size=0: set a chunk size >= 1 for fl.client_parallelism='chunked'")
  _positive_int(fl.unroll, "fl.unroll")
  check_one_of(fl.partition.method, PARTITION_METHODS, "fl.partition.method")
  check_one_of(fl.personalized_eval, ("auto", "on", "off"), "fl.personalized_eval")
  check_number(fl.client_test_fraction, "fl.client_test_fraction", low=0, high=1,
               low_open=True, high_open=True)
  check_number(fl.partition.dirichlet_alpha, "fl.partition.dirichlet_alpha", low=0, low_open=True)
  check_algorithm(channel_spec(config), fl.algorithm)
  population_settings(config)

  hy = config.hybrid
  check_one_of(hy.schedule, SCHEDULES, "hybrid.schedule")
  check_one_of(hy.adaptive_rule, ADAPTIVE_RULES, "hybrid.adaptive_rule")
  check_number(hy.mix_weight, "hybrid.mix_weight", low=0, high=1)
  check_number(hy.mix_weight_min, "hybrid.mix_weight_min", low=0, high=1)
  check_number(hy.beta, "hybrid.beta", low=0)
  _positive_int(hy.cloud_steps, "hybrid.cloud_steps")
  if config.mode == "hybrid":
    check_number(hy.cloud_fraction, "hybrid.cloud_fraction", low=0, high=1, low_open=True,
                 high_open=True)
    if hy.mix_weight < hy.mix_weight_min and hy.schedule == "adaptive":
      raise ConfigError(
          f"hybrid.mix_weight={hy.mix_weight} is below hybrid.mix_weight_min={hy.mix_weight_min}")


def _check_task(model: str, dataset: str) -> None:
  """A segmentation model needs per-pixel labels and a classifier one label per image."""
  model_task = MODELS[model].task
  data_task = "segmentation" if dataset in SEGMENTATION_DATASETS else "classification"
  if model_task != data_task:
    kind = {"segmentation": sorted(SEGMENTATION_DATASETS),
            "classification": sorted(set(DATASETS) - set(SEGMENTATION_DATASETS))}[model_task]
    models = sorted(n for n, cls in MODELS.items() if cls.task == data_task)
    raise ConfigError(
        f"model.name={model!r} is a {model_task} model but dataset.name={dataset!r} is a "
        f"{data_task} dataset: use one of {models} or a dataset of {kind}")


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def resume_changes(saved: dict, config: ml_collections.ConfigDict) -> tuple[list[str], bool]:
  """Compares a workdir's saved ``config.json`` with the config resuming it.

  Args:
    saved: the parsed ``config.json`` of the run being resumed.
    config: the config of the run about to resume it.

  Returns:
    ``(unsafe, safe_changed)``: one ``"name: old → new"`` per setting that differs
    and is not in :data:`RESUME_SAFE_SETTINGS` (a setting only one side has shows
    as ``<absent>``), sorted; and whether any safe setting differs. A config.json
    written before a setting existed is read with :data:`SETTINGS_ADDED_LATER`,
    one written before a rename under the new name
    (:data:`~isr_jax.config_names.RENAMED_SETTINGS`). The sections of
    algorithms the run does not read (``fl.fedprox`` under FedAvg) are skipped.
  """
  old = _flatten(current_names(saved))
  new = _flatten(json.loads(config.to_json_best_effort()))
  read = algorithm_sections_read(config) if old.get("fl.algorithm") == config.fl.algorithm \
      else frozenset()
  absent = object()
  show = lambda v: "<absent>" if v is absent else repr(v)
  unsafe, safe_changed = [], False
  for key in sorted(old.keys() | new.keys()):
    parts = key.split(".")
    if parts[0] == "fl" and len(parts) > 2 and parts[1] in ALGORITHMS and parts[1] not in read:
      continue  # never read by this run's algorithm (a changed fl.algorithm is shown)
    a, b = old.get(key, SETTINGS_ADDED_LATER.get(key, absent)), new.get(key, absent)
    if a == b:
      continue
    if key in RESUME_SAFE_SETTINGS or key.startswith(RESUME_SAFE_SECTIONS):
      safe_changed = True
    else:
      unsafe.append(f"{key}: {show(a)} → {show(b)}")
  return unsafe, safe_changed


def saved_config(saved: dict) -> ml_collections.ConfigDict:
  """A run's ``config.json`` as a config, completed for today's code.

  A setting the file lacks takes the value in :data:`SETTINGS_ADDED_LATER`
  (what that run computed) or else today's default, so a run saved before a
  setting existed can still be rebuilt and measured.
  """
  saved = current_names(saved)
  config = ml_collections.ConfigDict(saved)
  present = _flatten(saved)
  defaults = _flatten(json.loads(default_config().to_json_best_effort()))
  for key, value in {**defaults, **SETTINGS_ADDED_LATER}.items():
    if key in present:
      continue
    *path, leaf = key.split(".")
    node = config
    for part in path:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = value
  return config
