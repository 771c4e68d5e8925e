"""FedExP (Jhunjhunwala, Wang, Joshi, ICLR 2023): its server step size by hand, FedAvg
when the step is 1, and η_g logged by a jitted round of LeNet-5 with ISR on digits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import assert_trees_close, digits, small_setup

from isr_jax.config import default_config, validate
from isr_jax.data import pack_clients
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.fedexp import fedexp, server_step_size
from isr_jax.fl.round import fl_round
from isr_jax.fl.spec import FLSpec

SPEC = FLSpec(clients_per_round=3, local_epochs=1)


def two(values):
  return {"model": {"w": jnp.asarray(values, jnp.float32)}}


def stacked(*trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def test_step_size_and_pseudo_gradient_by_hand():
  # Δ = (1, 0), (−1, 0.2), and a padding row; w = (0.5, 0.5, 0): Σ w‖Δ‖² = 0.5 + 0.52 = 1.02,
  # Δ̄ = (0, 0.1), ‖Δ̄‖² = 0.01, S = 2, ε = 1e-3: η_g = 1.02 / (2 (0.01 + 0.002)) = 42.5.
  deltas = stacked(two([1.0, 0.0]), two([-1.0, 0.2]), two([9.0, 9.0]))
  weights = jnp.array([0.5, 0.5, 0.0])
  eta = server_step_size(deltas, weights, 1e-3)
  np.testing.assert_allclose(float(eta), 42.5, rtol=1e-5)
  pseudo, state, metrics = fedexp(1e-3).server_update(None, {}, {"delta": deltas}, weights)
  np.testing.assert_allclose(pseudo["model"]["w"], [0.0, -4.25], rtol=1e-5, atol=1e-6)
  assert state == {} and float(metrics["eta_g"]) == float(eta)


def test_clients_that_agree_give_fedavgs_step():
  # Equal updates: Σ w‖Δ‖² = ‖Δ̄‖², so the ratio is below 1/2 and η_g = 1.
  deltas = stacked(two([0.3, -0.4]), two([0.3, -0.4]))
  assert float(server_step_size(deltas, jnp.array([0.25, 0.75]), 1e-3)) == 1.0


def label_sorted_clients():
  """Six clients of one or two digits each: their updates pull apart."""
  train, _, _ = digits()
  parts = np.array_split(np.argsort(train.y, kind="stable")[:360], 6)
  return jax.tree.map(jnp.asarray, pack_clients(train.x, train.y, parts, batch_size=8))


def test_round_with_a_unit_step_is_fedavg_and_logs_the_step():
  data = label_sorted_clients()
  runs = {}
  # FedAvg reading the stacked messages, as FedExP does (the summed mean rounds otherwise).
  stacked_fedavg = fedavg()._replace(mean_messages=False)
  for name, algorithm in (("fedavg", stacked_fedavg), ("fedexp_unit", fedexp(epsilon=1e9)),
                          ("fedexp", fedexp())):
    state, fns, _ = small_setup(isr=True, algorithm=algorithm, data=data)
    runs[name] = jax.jit(functools.partial(fl_round, fns=fns, spec=SPEC))(state, data)
  (avg, m_avg), (unit, m_unit), (_, m_exp) = runs["fedavg"], runs["fedexp_unit"], runs["fedexp"]
  assert float(m_unit["server/eta_g"]) == 1.0
  assert_trees_close(unit.params, avg.params, atol=0)
  assert float(m_exp["server/eta_g"]) > 1.0  # one-class clients' updates partly cancel
  assert float(m_exp["comm/up_bytes"]) == float(m_avg["comm/up_bytes"])


@pytest.mark.parametrize("value", [0.0, -1.0])
def test_bad_epsilon_is_a_one_line_config_error(value):
  config = default_config()
  config.fl.algorithm = "fedexp"
  config.fl.fedexp.epsilon = value
  with pytest.raises(ConfigError, match="fl.fedexp.epsilon") as e:
    validate(config)
  assert "\n" not in str(e.value)
