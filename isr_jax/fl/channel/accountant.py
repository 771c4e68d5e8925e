"""The privacy a DP run spends, from Google's ``dp-accounting``: host-side, once per round.

A round of DP-FedAvg is one Gaussian mechanism on a sample of the clients:

- Poisson sampling: ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, under the
  add-or-remove-one-client relation (a client's data is in the population or
  not). The RDP accountant (Mironov, Talwar, Zhang 2019) and the PLD accountant
  (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022) both handle it.
- fixed-size sampling of ``K`` of ``N`` clients without replacement:
  ``SampledWithoutReplacementDpEvent(N, K, GaussianDpEvent(z / 2))``, under the
  replace-one-client relation (``N`` is public; a client's data is swapped for
  another's), the only one dp-accounting's RDP accountant accepts for it (Wang,
  Balle, Kasiviswanathan, AISTATS 2019, Thm. 27). Swapping one client moves the
  clipped sum by up to ``2C`` while the noise std is ``zC``, so the Gaussian
  event's multiplier, noise std over sensitivity, is ``z / 2``. The PLD
  accountant has no event for it.

``T`` rounds compose the round's event ``T`` times. Under Poisson sampling a
round has ``L`` lanes (:func:`poisson_lanes`); the clients that join beyond them
are left out, which the Poisson event does not describe. The round that truncates
differs from the untruncated one only when more than ``L`` clients join,
probability ``p`` (:func:`overflow_probability`), so ``T`` rounds are within total
variation ``Tp`` of the untruncated run and spend ``(ε, δ_acc + Tp(1 + e^ε))``:
:func:`epsilon_spent` reports the ``ε`` whose ``δ_acc = δ − Tp(1 + e^ε)``
(``p ≤ 10⁻¹²``, so the charge is far below any sensible ``δ``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import dp_accounting
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from isr_jax.errors import ConfigError

NeighborRel = dp_accounting.NeighboringRelation

# The per-round chance that more clients join than a Poisson round has lanes for.
OVERFLOW_PROBABILITY = 1e-12
# The largest noise multiplier calibration tries: the noise on the mean, zC/K̄,
# would swamp the clipped updates of any cohort short of ~10⁴ clients a round.
MAX_NOISE_MULTIPLIER = 1e4
# The PLD accountant's default grid of privacy-loss values.
_PLD_DISCRETIZATION = 1e-4


class Mechanism(NamedTuple):
  """What the accountant needs of a run (the fields it reads of a ``DPSpec``).

  Attributes:
    noise_multiplier: ``z``.
    sampling: ``fixed`` or ``poisson``.
    sampling_rate: ``q`` (Poisson).
    num_clients: ``N``.
    expected_clients: ``K`` (fixed-size sampling).
    accountant: ``rdp`` or ``pld``.
    delta: ``δ``.
  """

  noise_multiplier: float
  sampling: str
  sampling_rate: float
  num_clients: int
  expected_clients: float
  accountant: str = "rdp"
  delta: float = 1e-5


def _mechanism(spec: Any) -> Mechanism:
  """The accountant's view of a ``DPSpec``, a :class:`Mechanism` or a dict of its fields."""
  if isinstance(spec, Mechanism):
    return spec
  if isinstance(spec, dict):
    return Mechanism(**spec)
  return Mechanism(*(getattr(spec, name) for name in Mechanism._fields))


@functools.cache
def poisson_lanes(num_clients: int, sampling_rate: float) -> int:
  """``L``, a Poisson round's lanes: the fewest with ``P(Bin(N+1, q) > L) ≤ 10⁻¹²`` (≤ N).

  ``N + 1``: the population of the neighbouring dataset with one client more.
  E.g. ``N = 100, q = 0.1``: 36 lanes; ``N = 1000, q = 0.1``: 173.
  """
  n, q = num_clients, sampling_rate
  if q >= 1:
    return n
  lanes = max(int(stats.binom.isf(OVERFLOW_PROBABILITY, n + 1, q)), 1)
  while lanes < n and stats.binom.sf(lanes, n + 1, q) > OVERFLOW_PROBABILITY:
    lanes += 1
  return min(lanes, n)


def overflow_probability(mech: Mechanism) -> float:
  """``p``: the chance a round leaves joined clients out (0 for fixed-size sampling)."""
  if mech.sampling != "poisson":
    return 0.0
  lanes = poisson_lanes(mech.num_clients, mech.sampling_rate)
  if lanes >= mech.num_clients:
    return 0.0
  return float(stats.binom.sf(lanes, mech.num_clients + 1, mech.sampling_rate))


def round_event(spec_or_args: Any) -> dp_accounting.DpEvent:
  """One round's ``DpEvent`` (see the module docstring for the neighbouring relations)."""
  mech = _mechanism(spec_or_args)
  z = float(mech.noise_multiplier)
  if mech.sampling == "poisson":
    return dp_accounting.PoissonSampledDpEvent(float(mech.sampling_rate),
                                               dp_accounting.GaussianDpEvent(z))
  return dp_accounting.SampledWithoutReplacementDpEvent(
      int(mech.num_clients), int(round(mech.expected_clients)),
      dp_accounting.GaussianDpEvent(z / 2))


def dp_event(spec_or_args: Any, rounds: int) -> dp_accounting.DpEvent:
  """``rounds`` rounds of ``spec_or_args`` (a ``DPSpec``, :class:`Mechanism` or its dict)."""
  return dp_accounting.SelfComposedDpEvent(round_event(spec_or_args), int(rounds))


def make_accountant(accountant: str, sampling: str) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant for ``sampling``'s neighbouring relation (module docstring)."""
  if accountant == "pld":
    if sampling != "poisson":
      raise ConfigError("fl.dp.accountant='pld' accounts for Poisson sampling only: set "
                        "fl.dp.sampling='poisson', or fl.dp.accountant='rdp'")
    return dp_accounting.pld.PLDAccountant(NeighborRel.ADD_OR_REMOVE_ONE,
                                           _PLD_DISCRETIZATION)
  relation = NeighborRel.ADD_OR_REMOVE_ONE if sampling == "poisson" else NeighborRel.REPLACE_ONE
  return dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)


@functools.cache
def _rdp_per_round(mech: Mechanism) -> tuple[np.ndarray, np.ndarray]:
  """``(orders, RDP of one round)``: ``T`` rounds cost ``T`` times it at every order."""
  acc = make_accountant("rdp", mech.sampling)
  acc.compose(round_event(mech))
  # RDP composes by addition; read once, every later round count is a product.
  return np.asarray(acc._orders), np.asarray(acc._rdp)  # noqa: SLF001


class _Composed:
  """A PLD composed over some rounds, extended as later rounds are asked for."""

  def __init__(self, mech: Mechanism):
    self.one = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=mech.noise_multiplier, sampling_prob=mech.sampling_rate,
        value_discretization_interval=_PLD_DISCRETIZATION,
        neighboring_relation=NeighborRel.ADD_OR_REMOVE_ONE)
    self.rounds, self.pld = 1, self.one

  def at(self, rounds: int):
    if rounds < self.rounds:  # a resumed or earlier round: start over
      self.rounds, self.pld = 1, self.one
    if rounds > self.rounds:
      extra = self.one if rounds - self.rounds == 1 else self.one.self_compose(
          rounds - self.rounds)
      self.rounds, self.pld = rounds, self.pld.compose(extra)
    return self.pld


@functools.cache
def _pld(mech: Mechanism) -> _Composed:
  return _Composed(mech)


def _epsilon_at(mech: Mechanism, rounds: int, delta: float) -> float:
  """``ε`` of ``rounds`` untruncated rounds at ``delta``."""
  if delta <= 0:
    return math.inf
  if mech.noise_multiplier == 0:
    return math.inf
  if mech.accountant == "pld":
    return float(_pld(mech).at(rounds).get_epsilon_for_delta(delta))
  orders, rdp = _rdp_per_round(mech)
  eps, _ = rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, delta)
  return float(eps)


def epsilon_spent(spec: Any, rounds: int) -> float:
  """``ε`` that ``rounds`` rounds spend at ``spec.delta`` (``inf`` for ``z = 0``).

  Cheap enough to call every round: RDP scales one round's cached RDP curve; PLD
  composes the rounds since the last call onto a cached distribution. Under
  Poisson sampling the truncation's charge ``Tp(1 + e^ε)`` comes off ``δ``
  (module docstring), found by iterating ``ε`` up to its fixed point.
  """
  rounds = int(rounds)
  if rounds <= 0:
    return 0.0
  mech = _mechanism(spec)
  p = overflow_probability(mech)
  eps = _epsilon_at(mech, rounds, mech.delta)
  for _ in range(20):
    if p == 0 or not math.isfinite(eps):
      break
    charge = rounds * p * (1 + math.exp(min(eps, 700.0)))
    new = _epsilon_at(mech, rounds, mech.delta - charge)
    if new - eps <= 1e-12 * max(1.0, eps):
      eps = new
      break
    eps = new
  return eps


# Cached: a run's config is checked (config.validate) and then built, and each reads the
# calibrated z; the search composes the accountant dozens of times (seconds).
@functools.lru_cache(maxsize=32)
def calibrate_noise_multiplier(target_epsilon: float, delta: float, *, sampling_rate: float,
                               num_clients: int, clients_per_round: int, rounds: int,
                               accountant: str = "rdp", sampling: str = "fixed") -> float:
  """The smallest ``z`` with which ``rounds`` rounds spend at most ``(target_epsilon, delta)``.

  Brent's method on dp-accounting's own ε (``calibrate_dp_mechanism``), searched
  up to ``MAX_NOISE_MULTIPLIER``; a ConfigError (one line) when that is not enough.
  """
  mech = Mechanism(1.0, sampling, float(sampling_rate), int(num_clients),
                   float(clients_per_round), accountant, float(delta))
  # With ε = target, the truncation's charge is known: calibrate at the δ left after it.
  acc_delta = delta - rounds * overflow_probability(mech) * (1 + math.exp(min(target_epsilon,
                                                                              700.0)))
  def unreachable(why: str) -> ConfigError:
    return ConfigError(
        f"fl.dp.target_epsilon={target_epsilon:g} is unreachable at fl.dp.delta={delta:g} "
        f"over num_rounds={rounds} with q={sampling_rate:.4g}: {why}; raise "
        "fl.dp.target_epsilon or fl.dp.delta, or lower num_rounds")

  if acc_delta <= 0:
    raise unreachable("the chance that a Poisson round leaves clients out already exceeds δ")
  make_event = lambda z: dp_event(mech._replace(noise_multiplier=float(z)), rounds)
  spent = lambda z: make_accountant(accountant, sampling).compose(
      make_event(z)).get_epsilon(acc_delta)
  worst = spent(MAX_NOISE_MULTIPLIER)
  if worst > target_epsilon:
    raise unreachable(f"even noise_multiplier={MAX_NOISE_MULTIPLIER:g} spends ε={worst:.4g}")
  # A bracket [lo, hi] with ε(lo) > target ≥ ε(hi), by doubling or halving from z = 1;
  # dp-accounting's own search starts at z = 0, where fixed-size sampling's RDP divides by 0.
  lo, hi = 1.0, 1.0
  if spent(1.0) > target_epsilon:
    while spent(hi) > target_epsilon:
      lo, hi = hi, min(2 * hi, MAX_NOISE_MULTIPLIER)
  else:
    while lo > 1e-6 and spent(lo) <= target_epsilon:
      lo, hi = lo / 2, lo
  return float(mechanism_calibration.calibrate_dp_mechanism(
      lambda: make_accountant(accountant, sampling), make_event, target_epsilon, acc_delta,
      mechanism_calibration.ExplicitBracketInterval(lo, hi), tol=1e-6))
