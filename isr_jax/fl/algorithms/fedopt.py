"""FedAdagrad, FedAdam, FedYogi (Reddi, Charles, Zaheer, Garrett, Rush, Konečný,
Kumar, McMahan, ICLR 2021, "Adaptive Federated Optimization", Algorithm 2).

Clients are FedAvg's; the server treats the averaged client change
``Δ_t = Σ_n w_n (θ_n − θ_t)`` as a gradient for an adaptive optimizer:

* ``m_t = β1 m_{t−1} + (1 − β1) Δ_t``;
* ``v_t = v_{t−1} + Δ_t²`` (FedAdagrad),
  ``v_t = β2 v_{t−1} + (1 − β2) Δ_t²`` (FedAdam),
  ``v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)`` (FedYogi);
* ``θ_{t+1} = θ_t + η m_t / (√v_t + τ)``.

There is no bias correction (as in Algorithm 2), and ``v_{−1} = τ²`` (the
paper asks for ``v_{−1} ≥ τ²``). Each rule is an optax
``GradientTransformation`` fed our pseudo-gradient ``g = −Δ_t``: since the
update is odd in ``m`` and ``v`` sees only ``Δ_t²``, it keeps ``m`` of ``g``
and returns ``−η m / (√v + τ)``. It replaces ``fl.server_optimizer``.

Defaults: β1 = 0.9, β2 = 0.99, τ = 1e-3 (the paper's fixed β's and the
authors' recommended τ); server learning rate η = 10^{-2} for FedAdam/FedYogi
and 10^{-1} for FedAdagrad, the best values the authors' grid search picked
most often over their six tasks (10^{-1} ties with 10^{-1.5} for FedAdagrad).
FedAdagrad defaults to β1 = 0: the authors' experiments ran the server Adagrad
without momentum (a Keras Adagrad, google-research/federated optimization
README), with an initial accumulator of 0 where Algorithm 2 asks for ``≥ τ²``.
η is a per-task choice in the paper: with β1 = 0 the first step is
``η Δ/(|Δ| + τ)``, close to ``η`` on every coordinate whose change exceeds τ,
which 10^{-1} makes too large for a small unnormalised network (LeNet-5 on
digits: experiments/RESULTS.md at commit cc57a03, where the comparison uses 10^{-1.5}).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from isr_jax.config_checks import check_number
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg

RULES = ("adagrad", "adam", "yogi")


class AdaptiveServerState(NamedTuple):
  """First and second moments of the pseudo-gradient."""

  m: optax.Updates
  v: optax.Updates


def _second_moment(rule: str, b2: float):
  if rule == "adagrad":
    return lambda v, g2: v + g2
  if rule == "adam":
    return lambda v, g2: b2 * v + (1.0 - b2) * g2
  if rule == "yogi":
    return lambda v, g2: v - (1.0 - b2) * g2 * jnp.sign(v - g2)
  raise ValueError(f"rule={rule!r} is not one of {list(RULES)}")


def adaptive_server_optimizer(rule: str, learning_rate: float, *, b1: float = 0.9,
                              b2: float = 0.99, tau: float = 1e-3
                              ) -> optax.GradientTransformation:
  """Algorithm 2's server step for ``rule`` in ``adagrad``, ``adam``, ``yogi``.

  Args:
    rule: which second-moment update.
    learning_rate: server learning rate η > 0.
    b1: first-moment decay β1 ∈ [0, 1).
    b2: second-moment decay β2 ∈ [0, 1) (unused by ``adagrad``).
    tau: adaptivity τ > 0; also ``v_{−1} = τ²``.

  Returns:
    An optax transformation mapping the pseudo-gradient ``−Δ_t`` to the
    parameter update ``η m_t / (√v_t + τ)`` (in ``Δ`` terms).
  """
  second = _second_moment(rule, b2)

  def init(params):
    return AdaptiveServerState(
        m=jax.tree.map(jnp.zeros_like, params),
        v=jax.tree.map(lambda p: jnp.full_like(p, tau * tau), params))

  def update(updates, state, params=None):
    del params
    m = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.m, updates)
    v = jax.tree.map(lambda v, g: second(v, g * g), state.v, updates)
    step = jax.tree.map(lambda m, v: -learning_rate * m / (jnp.sqrt(v) + tau), m, v)
    return step, AdaptiveServerState(m=m, v=v)

  return optax.GradientTransformation(init, update)


def _fedopt(name: str, rule: str, learning_rate: float, b1: float, b2: float,
            tau: float) -> FLAlgorithm:
  if learning_rate <= 0 or tau <= 0:
    raise ValueError(f"{name}: learning_rate={learning_rate} and tau={tau} must be > 0")
  if not (0 <= b1 < 1 and 0 <= b2 < 1):
    raise ValueError(f"{name}: b1={b1} and b2={b2} must be in [0, 1)")
  tx = adaptive_server_optimizer(rule, learning_rate, b1=b1, b2=b2, tau=tau)
  return fedavg()._replace(name=name, server_optimizer=tx)


def fedadagrad(learning_rate: float = 0.1, *, b1: float = 0.0, tau: float = 1e-3
               ) -> FLAlgorithm:
  return _fedopt("fedadagrad", "adagrad", learning_rate, b1, 0.0, tau)


def fedadam(learning_rate: float = 0.01, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> FLAlgorithm:
  return _fedopt("fedadam", "adam", learning_rate, b1, b2, tau)


def fedyogi(learning_rate: float = 0.01, *, b1: float = 0.9, b2: float = 0.99,
            tau: float = 1e-3) -> FLAlgorithm:
  return _fedopt("fedyogi", "yogi", learning_rate, b1, b2, tau)


# FedAdagrad / FedAdam / FedYogi (Reddi et al., ICLR 2021, Algorithm 2, §5):
# β1 = 0.9, β2 = 0.99, τ = 1e-3 (their README: τ "at least 0.001"); the server
# rate η is tuned per task on a half-decade grid, 10^-1 (FedAdagrad) and 10^-2
# (FedAdam, FedYogi) the values picked most often. FedAdagrad's β1 = 0: their
# experiments ran a Keras Adagrad on the server (README), which has no momentum.
FEDADAGRAD_DEFAULTS = dict(learning_rate=0.1, b1=0.0, tau=1e-3)
FEDADAM_DEFAULTS = dict(learning_rate=0.01, b1=0.9, b2=0.99, tau=1e-3)
FEDYOGI_DEFAULTS = dict(learning_rate=0.01, b1=0.9, b2=0.99, tau=1e-3)


def settings(config, name: str) -> dict:
  """The arguments of :func:`fedadagrad`, :func:`fedadam` or :func:`fedyogi` from
  ``config.fl.<name>`` (FedAdagrad has no ``b2``)."""
  c = config.fl[name]
  out = dict(learning_rate=check_number(c.learning_rate, f"fl.{name}.learning_rate", low=0,
                                        low_open=True),
             tau=check_number(c.tau, f"fl.{name}.tau", low=0, low_open=True))
  for beta in ("b1", "b2") if "b2" in c else ("b1",):
    out[beta] = check_number(c[beta], f"fl.{name}.{beta}", low=0, high=1, high_open=True)
  return out
