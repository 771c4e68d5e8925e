"""benchmarks/memory.py and benchmarks/harness.py: what the memory sections measure."""

import jax
import numpy as np

from benchmarks import harness, memory


def test_summed_messages_need_less_scratch_than_stacked():
  # LeNet-5 instead of ResNet-18: the same round, compiled in seconds.
  stacked, model_bytes = memory.round_scratch_bytes(6, "lenet5", "sequential", summed=False)
  summed, same = memory.round_scratch_bytes(6, "lenet5", "sequential", summed=True)
  assert same == model_bytes > 0
  assert summed < stacked


def test_personal_state_is_one_whole_model_per_client():
  r = memory.personal_state(3, "lenet5")
  assert r["clients"] == 3
  assert np.isclose(r["personal_state_gib"] * 2**30, 3 * 4 * r["params"])
  assert r["peak_rss_gib"] > 0


def test_round_is_built_through_make_round():
  problem, params, data = memory.synthetic_problem(2, "lenet5")
  fl = memory.fedavg_round(problem, memory.FLSpec(clients_per_round=2, local_steps=1),
                           personal="all")
  state = fl.init(params, data, jax.random.PRNGKey(2))
  assert fl.fns.algorithm.personal == "all"
  personal = state.client_states["personal"]["model"]  # every client's whole model
  assert jax.tree.structure(personal) == jax.tree.structure(params["model"])
  assert all(x.shape == (2, *y.shape) for x, y in
             zip(jax.tree.leaves(personal), jax.tree.leaves(params["model"]), strict=True))


def test_harness_labels_and_tables():
  assert harness.strategy_label("auto", "chunked", 4) == "auto (= chunked, chunks of 4)"
  assert harness.strategy_label("chunked", "chunked", 4) == "chunked (chunks of 4)"
  assert harness.strategy_label("sequential", "sequential", 0) == "sequential"
  assert harness.table_header("a", "b") == "| a | b |\n|---|---|"
  assert harness.table_row(1, "x") == "| 1 | x |"
  assert harness.machine_description("2.0").startswith("machine: ")
  assert "; torch 2.0; " in harness.machine_description("2.0")
  times = harness.interleaved_times([lambda: None, lambda: None], 2)
  assert times.shape == (2, 2) and (times >= 0).all()
