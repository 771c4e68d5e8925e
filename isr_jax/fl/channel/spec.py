"""The channel's settings: one config section per part, one static spec for the round.

``config.fl.dp``, ``config.fl.robust`` (rules and the attacks they are tested
against), ``config.fl.compression`` and ``config.fl.stragglers`` come from each
part's module (``DEFAULTS``, and ``settings`` that reads and checks them, one
ConfigError line per bad value). :func:`channel_spec` turns them into a
:class:`ChannelSpec`, ``None`` for each part that is off; :func:`check_algorithm`
refuses, in one line, the algorithms a part cannot be combined with and why.
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from isr_jax.errors import ConfigError
from isr_jax.fl.channel import attacks, compression, dp, robust, stragglers

# config.fl.<section> -> the module that owns it.
SECTIONS = {"dp": dp, "robust": robust, "compression": compression, "stragglers": stragglers}

# Why a part that needs each client's own message (DP clips it, a robust rule ranks
# it) cannot be added to these algorithms: their server reads more than the
# clients' mean model update.
_READS_EACH_MESSAGE = {
    "scaffold": "each client also sends its control-variate update c_i+ - c_i, which the "
                "server adds up as it is",
    "fednova": "each client also sends its local step count a_i, with which the server "
               "rescales every update",
    "fedaims": "each client also sends its class prototypes (mean features of its own "
               "examples per class)",
    "fedaims_full": "each client also sends its class prototypes (mean features of its own "
                    "examples per class)",
    "fedexp": "its server step size reads every client's own update norm ||Δ_i||²",
    "fedgau": "its server weighs each client by the distance of its feature statistics",
    "local": "nothing travels: every client keeps its whole model",
}


class ChannelSpec(NamedTuple):
  """Static settings of the channel; a part is ``None`` when it is off.

  Attributes:
    dp: client-level differential privacy (:class:`isr_jax.fl.channel.dp.DPSpec`).
    robust: a robust aggregation rule (:class:`isr_jax.fl.channel.robust.RobustSpec`).
    attack: malicious sampled clients (:class:`isr_jax.fl.channel.attacks.AttackSpec`).
    compression: the uplink's compressor
      (:class:`isr_jax.fl.channel.compression.CompressionSpec`).
    stragglers: partial work and dropouts
      (:class:`isr_jax.fl.channel.stragglers.StragglerSpec`).
  """

  dp: dp.DPSpec | None = None
  robust: robust.RobustSpec | None = None
  attack: attacks.AttackSpec | None = None
  compression: compression.CompressionSpec | None = None
  stragglers: stragglers.StragglerSpec | None = None

  @property
  def reads_each_message(self) -> bool:
    """The server sees every client's message, not only their mean (DP, a rule, an attack)."""
    return self.dp is not None or self.robust is not None or self.attack is not None

  @property
  def needs_mean_messages(self) -> bool:
    """A part replaces the clients' mean by another estimate of it (DP, a rule)."""
    return self.dp is not None or self.robust is not None


def channel_defaults() -> dict[str, ml_collections.ConfigDict]:
  """``{section: defaults}`` for ``config.fl``."""
  return {name: ml_collections.ConfigDict(dict(module.DEFAULTS))
          for name, module in SECTIONS.items()}


def channel_spec(config: ml_collections.ConfigDict, num_classes: int = 0) -> ChannelSpec:
  """The run's :class:`ChannelSpec`, every section checked (one ConfigError line).

  ``num_classes`` is the dataset's, read by the label-flipping attack.
  """
  spec = ChannelSpec(
      dp=dp.settings(config),
      robust=robust.settings(config),
      attack=attacks.settings(config, num_classes),
      compression=compression.settings(config),
      stragglers=stragglers.settings(config),
  )
  if spec.dp is not None and spec.robust is not None:
    raise ConfigError(
        f"fl.dp.enabled=True with fl.robust.rule={config.fl.robust.rule!r}: the noise of DP "
        "is added to the clients' sum, so a rule that ranks each client's update has no "
        "place after it; use one of them")
  return spec


def check_algorithm(spec: ChannelSpec, name: str, mean_messages: bool | None = None) -> None:
  """A ConfigError when a part of ``spec`` cannot work with algorithm ``name`` (says why).

  DP and the robust rules replace the clients' mean update; they need an
  algorithm whose server reads only that mean (``mean_messages``; ``None``: judge
  by the name alone, before the algorithm is built). Personal parameters never
  travel, so the personalized algorithms compose.
  """
  if not spec.needs_mean_messages:
    return
  if name not in _READS_EACH_MESSAGE and mean_messages is not False:
    return
  part = "fl.dp.enabled=True" if spec.dp is not None else f"fl.robust.rule={spec.robust.rule!r}"
  why = _READS_EACH_MESSAGE.get(
      name, "its server reads each client's message, not only their mean update")
  raise ConfigError(
      f"{part} cannot be combined with fl.algorithm={name!r}: {why}; "
      f"{'DP' if spec.dp is not None else 'a robust rule'} applies to algorithms whose "
      "clients send only a model update that the server averages (FedAvg, FedProx, "
      "FedPer, ...)")
