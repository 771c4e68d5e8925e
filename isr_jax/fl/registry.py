"""Config name -> federated algorithm.

Each algorithm's module owns its settings: ``DEFAULTS`` (cited; they become
``config.fl.<name>``) and ``settings(config, name)``, which reads
``config.fl.<name>`` (and, where the algorithm needs them, settings such as
``fl.num_clients`` or the clients' optimizer) and rejects a bad value with a
one-line ConfigError naming the setting. This table only names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import ml_collections

from isr_jax.config_checks import check_number, check_one_of
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import FLAlgorithm, LocalProblem
from isr_jax.fl.algorithms import (
    apfl,
    balancefl,
    ditto,
    fedaims,
    fedala,
    fedavg,
    fedavgm,
    fedbabu,
    feddyn,
    fedexp,
    fedgau,
    fedir,
    fednova,
    fedntd,
    fedopt,
    fedper,
    fedprox,
    fedrep,
    fedrod,
    fedsol,
    lg_fedavg,
    local,
    moon,
    scaffold,
)


def _no_settings(config, name: str) -> dict:
  del config, name
  return {}


class Registered(NamedTuple):
  """One algorithm: ``build(**settings(config, name))`` makes it.

  Attributes:
    build: the algorithm's constructor.
    defaults: its hyper-parameters' defaults, ``config.fl.<name>``.
    settings: ``(config, name) -> build's keyword arguments``, checked.
    needs_problem: ``build`` also takes the run's ``problem=`` (FedAIMS sizes its
      per-client adapters from the model's taps).
  """

  build: Callable[..., FLAlgorithm]
  defaults: Mapping[str, Any] = {}
  settings: Callable[[ml_collections.ConfigDict, str], dict] = _no_settings
  needs_problem: bool = False


# Proximal terms that can drive FedSoL's perturbation (FedSoL paper App. H):
# name -> (config -> (base algorithm, proximal loss)). The base algorithm keeps
# its own state and server rule; its proximal term becomes loss A.
PROXIMAL_SOURCES: dict[str, Callable[[ml_collections.ConfigDict], tuple]] = {
    "kl": lambda config: (fedavg.fedavg(), fedsol.kl_proximal_loss(check_number(
        config.fl.fedsol.tau, "fl.fedsol.tau", low=0, low_open=True))),
    "fedprox": lambda config: (
        fedprox.fedprox(**(s := fedprox.settings(config))), fedprox.fedprox_proximal_loss(s["mu"])),
    "feddyn": lambda config: (
        feddyn.feddyn(**(s := feddyn.settings(config))), feddyn.feddyn_proximal_loss(s["alpha"])),
    "moon": lambda config: (
        moon.moon(**(s := moon.settings(config))), moon.moon_proximal_loss(s["mu"], s["tau"])),
}


def _moon_stationary(params, anchor, ctx):
  # With the previous model equal to the global one (every client in round 1),
  # z_prev = z_glob makes ℓ_con = log 2 for every w: its gradient vanishes.
  del params
  return fedsol.trees_equal(ctx["prev"], anchor["model"])


# Where each source's gradient vanishes by construction (the KL at w = w_g, ...):
# there FedSoL sets it to exactly 0 instead of normalising rounding noise into a
# ρ-sized perturbation (see isr_jax.fl.algorithms.fedsol). Every source is listed (a test
# checks it), None where there is no such point: FedDyn's gradient at w = w_g is
# −∇L_i(θ_i^{t−1}), genuine, and computed exactly 0 when that is 0.
PROXIMAL_STATIONARY = {"kl": fedsol.model_at_anchor, "fedprox": fedsol.params_at_anchor,
                       "feddyn": None, "moon": _moon_stationary}


def _fedsol_settings(config, name: str = "fedsol") -> dict:
  """FedSoL's radius and perturbation, and its proximal source's base algorithm and loss."""
  source = check_one_of(config.fl[name].proximal, PROXIMAL_SOURCES, f"fl.{name}.proximal")
  base, prox = PROXIMAL_SOURCES[source](config)
  return dict(**fedsol.sam_settings(config, name), base=base, proximal_loss=prox,
              stationary=PROXIMAL_STATIONARY[source])


ALGORITHMS: dict[str, Registered] = {
    "fedavg": Registered(fedavg.fedavg),
    # -- sharpness-aware local steps --
    "fedsam": Registered(fedsol.fedsam, fedsol.FEDSAM_DEFAULTS, fedsol.sam_settings),
    "fedasam": Registered(fedsol.fedasam, fedsol.FEDASAM_DEFAULTS, fedsol.sam_settings),
    "fedsol": Registered(fedsol.fedsol, fedsol.DEFAULTS, _fedsol_settings),
    # -- drift correction and server optimizers --
    "fedprox": Registered(fedprox.fedprox, fedprox.DEFAULTS, fedprox.settings),
    "feddyn": Registered(feddyn.feddyn, feddyn.DEFAULTS, feddyn.settings),
    "scaffold": Registered(scaffold.scaffold, scaffold.DEFAULTS, scaffold.settings),
    "fednova": Registered(fednova.fednova, settings=fednova.settings),
    "fedir": Registered(fedir.fedir),
    "fedavgm": Registered(fedavgm.fedavgm, fedavgm.DEFAULTS, fedavgm.settings),
    "fedadagrad": Registered(fedopt.fedadagrad, fedopt.FEDADAGRAD_DEFAULTS, fedopt.settings),
    "fedadam": Registered(fedopt.fedadam, fedopt.FEDADAM_DEFAULTS, fedopt.settings),
    "fedyogi": Registered(fedopt.fedyogi, fedopt.FEDYOGI_DEFAULTS, fedopt.settings),
    "fedexp": Registered(fedexp.fedexp, fedexp.DEFAULTS, fedexp.settings),
    # -- representation, distillation and imbalance --
    "moon": Registered(moon.moon, moon.DEFAULTS, moon.settings),
    "fedntd": Registered(fedntd.fedntd, fedntd.DEFAULTS, fedntd.settings),
    "balancefl": Registered(balancefl.balancefl, balancefl.DEFAULTS, balancefl.settings),
    "fedgau": Registered(fedgau.fedgau, fedgau.DEFAULTS, fedgau.settings),
    # -- personalized (FedAIMS Table 2) --
    "ditto": Registered(ditto.ditto, ditto.DEFAULTS, ditto.settings),
    "fedrod": Registered(fedrod.fedrod, fedrod.DEFAULTS, fedrod.settings),
    "fedala": Registered(fedala.fedala, fedala.DEFAULTS, fedala.settings),
    "apfl": Registered(apfl.apfl, apfl.DEFAULTS, apfl.settings),
    "local": Registered(local.local),
    "fedper": Registered(fedper.fedper),
    "lg_fedavg": Registered(lg_fedavg.lg_fedavg),
    "fedrep": Registered(fedrep.fedrep, fedrep.DEFAULTS, fedrep.settings),
    "fedbabu": Registered(fedbabu.fedbabu, fedbabu.DEFAULTS, fedbabu.settings),
    "fedaims": Registered(fedaims.fedaims, fedaims.DEFAULTS, fedaims.settings,
                          needs_problem=True),
    "fedaims_full": Registered(fedaims.fedaims, fedaims.DEFAULTS, fedaims.settings,
                               needs_problem=True),
}


def is_personalized(algorithm: FLAlgorithm) -> bool:
  """Whether clients of ``algorithm`` end a round with models of their own."""
  return bool(algorithm.personal) or algorithm.eval_model is not None


def personalized_eval_on(config, algorithm: FLAlgorithm) -> bool:
  """``fl.personalized_eval``: ``on``, ``off``, or (``auto``) on for personalized algorithms."""
  setting = config.fl.personalized_eval
  return setting == "on" or (setting == "auto" and is_personalized(algorithm))


def global_model_algorithms(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The algorithms whose result is one global model, built with ``config``'s settings.

  The ones that need the model to be built (FedAIMS, whose adapters are per
  client) keep a personal head and are left out with the other personalized ones.
  """
  def global_model(name: str, entry: Registered) -> bool:
    if entry.needs_problem:
      return False
    return not is_personalized(entry.build(**entry.settings(config, name)))

  return tuple(sorted(name for name, entry in ALGORITHMS.items() if global_model(name, entry)))


def algorithm_defaults() -> ml_collections.ConfigDict:
  """``{name: hyper-parameter defaults}`` for ``config.fl``."""
  return ml_collections.ConfigDict({n: dict(e.defaults) for n, e in ALGORITHMS.items()})


def _registered(config: ml_collections.ConfigDict) -> Registered:
  name = config.fl.algorithm
  if name not in ALGORITHMS:
    raise ConfigError(f"fl.algorithm={name!r} is not one of {sorted(ALGORITHMS)}")
  return ALGORITHMS[name]


def check_algorithm_settings(config: ml_collections.ConfigDict) -> None:
  """A one-line ConfigError for the first bad setting of ``config.fl.algorithm``."""
  _registered(config).settings(config, config.fl.algorithm)


class _ReadRecorder:
  """A read-only view of a config that notes the dotted name of every value read."""

  def __init__(self, node, prefix: str, read: set[str]):
    self._node, self._prefix, self._read = node, prefix, read

  def __getitem__(self, key):
    value = self._node[key]
    name = f"{self._prefix}{key}"
    self._read.add(name)
    if isinstance(value, ml_collections.ConfigDict):
      return _ReadRecorder(value, f"{name}.", self._read)
    return value

  __getattr__ = __getitem__

  def get(self, key, default=None):
    return self[key] if key in self._node else default

  def __contains__(self, key) -> bool:
    return key in self._node


def algorithm_sections_read(config: ml_collections.ConfigDict) -> frozenset[str]:
  """The algorithms whose ``fl.<name>`` section the run's algorithm reads.

  Its own, and those it borrows (FedSoL's proximal source reads
  ``fl.fedprox``, ``fl.feddyn`` or ``fl.moon``); found by recording what its
  settings read, so a new algorithm needs no entry here.
  """
  read: set[str] = set()
  _registered(config).settings(_ReadRecorder(config, "", read), config.fl.algorithm)
  return frozenset(n for n in ALGORITHMS if any(r.startswith(f"fl.{n}.") for r in read))


def check_unused_algorithm_settings(config: ml_collections.ConfigDict) -> None:
  """A ConfigError for a value outside its range in another algorithm's section.

  The run does not read ``fl.fedprox.mu`` under FedAvg, but ``mu=-1`` there is
  still a mistake (and would be carried into a resumed or compared run). Only
  each section's own values are checked: what an algorithm asks of the rest of
  the config (FedNova's plain SGD) matters only when it runs.
  """
  for name, entry in ALGORITHMS.items():
    if name == config.fl.algorithm:
      continue
    try:
      entry.settings(config, name)
    except ConfigError as e:
      if str(e).startswith(f"fl.{name}."):
        raise


def make_algorithm(config: ml_collections.ConfigDict,
                   problem: LocalProblem | None = None) -> FLAlgorithm:
  """The algorithm named by ``config.fl.algorithm``, built once from ``config``.

  ``problem`` is the run's :class:`LocalProblem`; only the algorithms whose state
  depends on the model (FedAIMS) read it, and for them it is required.
  """
  entry = _registered(config)
  name = config.fl.algorithm
  kwargs = entry.settings(config, name)
  if entry.needs_problem:
    if problem is None:
      raise ValueError(f"fl.algorithm={name!r} depends on the model's taps: "
                       "make_algorithm(config, problem) needs the run's problem")
    kwargs["problem"] = problem
  return entry.build(**kwargs)
