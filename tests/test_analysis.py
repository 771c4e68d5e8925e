"""methods §3 quantities: CL–FL gap, paired wins, escape-time bound, heterogeneity."""

import functools
import math

import jax
import numpy as np
import pytest
from support import small_setup, uneven_clients

from isr_jax.analysis import cl_fl_gap, escape_time_bound, paired_wins, relative_gap_reduction
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec


def test_gap_and_relative_reduction():
  # The paper's DeepLabv3+ average: D 4.67 -> 3.62 is a 22.5 % reduction.
  assert cl_fl_gap(50.0, 45.33) == pytest.approx(4.67)
  assert relative_gap_reduction(4.67, 3.62) == pytest.approx(0.22484, abs=1e-4)
  assert math.isnan(relative_gap_reduction(0.0, 1.0))
  assert math.isnan(relative_gap_reduction(-2.0, 1.0))


def test_paired_wins_counts_strict_improvements():
  results = {
      ("fedavg", False): {"a": 0.5, "b": 0.4}, ("fedavg", True): {"a": 0.6, "b": 0.4},
      ("fedprox", False): {"a": 0.5, "b": 0.4}, ("fedprox", True): {"a": 0.4, "b": 0.5},
      ("moon", True): {"a": 0.9, "b": 0.9},  # no -ISR run: not compared
  }
  assert paired_wins(results, ["a", "b"]) == (2, 4)
  assert paired_wins(results, ["a", "b"], higher_is_better=False) == (1, 4)
  results[("fedprox", True)] = {"a": float("nan"), "b": 0.5}  # a diverged run
  assert paired_wins(results, ["a", "b"]) == (2, 3)


def test_escape_time_bound_formula_and_undefined_region():
  kw = dict(eta=0.1, gamma=0.5, c0=2.0, radius=1.0, y0=1.0, b_eff=0.1, sigma_eff=0.2,
            delta=0.1)
  c_sigma = 0.2 * math.sqrt(math.log(2 / 0.1) / (0.1 * 0.5))
  denom = 1.0 - 0.1 * (0.1 / 0.5) - 0.1 * c_sigma
  expected = math.log(2.0 / denom) / (0.1 * 0.5)
  assert escape_time_bound(**kw) == pytest.approx(expected)
  # Weak curvature: the noise term swallows y0 -> undefined, never negative.
  assert math.isnan(escape_time_bound(**{**kw, "gamma": 1e-4}))
  assert escape_time_bound(**{**kw, "c0": 1e-3}) == 0.0
  assert math.isnan(escape_time_bound(**{**kw, "delta": 1.5}))


def test_heterogeneity_is_zero_for_identical_clients_and_positive_otherwise():
  spec = FLSpec(clients_per_round=3, local_steps=1, measure_heterogeneity=True)
  data = uneven_clients()
  state, fns, _ = small_setup(isr=False, data=data)
  _, m = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, data)
  assert float(m["fl/heterogeneity"]) > 0
  # Three copies of one 8-example client: its first batch is the same set of
  # examples whatever the client's shuffle, so the gradients coincide.
  one = uneven_clients(sizes=(8,) * 3, batch_size=8)
  same = jax.tree.map(lambda a: np.broadcast_to(a[:1], a.shape).copy(), jax.device_get(one))
  state, fns, _ = small_setup(isr=False, data=same)
  _, m = jax.jit(functools.partial(fl_round, fns=fns, spec=spec))(state, same)
  assert abs(float(m["fl/heterogeneity"])) < 1e-5
