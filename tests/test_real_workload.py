"""benchmarks/real_workload: step counts by hand, and both sides train the same clients."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
from test_cross_silo import _write_idx

from benchmarks import real_workload as rw
from benchmarks import torch_baseline
from isr_jax.experiment import build_experiment

TINY = rw.Workload("tiny", "dirichlet", num_clients=6, clients_per_round=4, local_epochs=2)


def test_padding_steps_by_hand():
  sizes, b, e = [10, 130, 64], 64, 2  # ceil(n/64) = 1, 3, 1
  assert rw.real_steps(sizes, b, e) == 2 * (1 + 3 + 1) == 10
  steps = lambda p, chunk=0, mesh=None: rw.executed_steps(
      sizes, batch_size=b, epochs=e, parallelism=p, chunk_size=chunk, mesh=mesh)
  assert steps("sequential") == 10  # each client its own steps
  assert steps("vmap") == 3 * 2 * 3 == 18  # every lane runs the longest client's
  # By size: 130, 64 | 10 -> 2 lanes × 6 steps + 1 lane × 2 steps.
  assert steps("chunked", 2) == 2 * 6 + 2 == 14
  assert steps("chunked", 1) == 10
  # Two devices: padded with an empty client, dealt in snake order:
  # device 0 gets 130 and the empty one, device 1 gets 64 and 10.
  two = SimpleNamespace(size=2)
  assert steps("vmap", mesh=two) == 2 * 6 + 2 * 2 == 16
  assert steps("sequential", mesh=two) == 10


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  """Small stand-in Fashion-MNIST IDX files: 600 training images, 28×28."""
  d = tmp_path_factory.mktemp("fmnist")
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 600), ("t10k", 50)):
    _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
  return str(d)


def test_lenet5_sizes_match():
  pytest.importorskip("torch")
  n = sum(p.numel() for p in torch_baseline.torch_lenet5().parameters())
  assert n == 61_706


@pytest.mark.slow
def test_jax_round_and_torch_loop_train_the_same_clients(fmnist_dir):
  data, train, clients, ids, rows = rw.build_rows(
      TINY, [("chunked", 2)], rounds=2, data_dir=fmnist_dir)
  sizes = np.array([len(c) for c in clients])
  assert sorted(np.concatenate(clients).tolist()) == list(range(600))
  assert len(set(sizes.tolist())) > 1
  rw.check_same_clients(data, train, clients)  # the JAX rows' data rows are these sets
  with pytest.raises(AssertionError, match="client 0"):
    rw.check_same_clients(data, train, [clients[1], clients[0], *clients[2:]])
  assert [len(set(r.tolist())) for r in ids] == [4, 4]

  # The round samples the predicted clients: SCAFFOLD's c_i changes exactly for them.
  config = rw.workload_config(TINY, data_dir=fmnist_dir)
  config.fl.algorithm = "scaffold"
  exp = build_experiment(config)
  state = exp.state
  for r in range(2):
    before = np.asarray(jax.tree.leaves(state.client_states)[0]).copy()
    state, _ = exp.round_fn(state, *exp.round_data)
    after = np.asarray(jax.tree.leaves(state.client_states)[0])
    changed = np.flatnonzero(np.any((before != after).reshape(len(before), -1), axis=1))
    assert sorted(changed.tolist()) == sorted(ids[r].tolist())

  # The benchmark's FedAvg row ran those clients' real steps (fl/local_steps: their mean).
  (_, _, _, step, state), = rows
  for r in range(2):
    state, metrics = step(state, data)
    want = rw.real_steps(sizes[ids[r]], 64, TINY.local_epochs) / TINY.clients_per_round
    assert float(metrics["fl/local_steps"]) == pytest.approx(want)

  if not torch_baseline.torch_available():
    return
  log = []
  one_round = torch_baseline.torch_fedavg_runner(train.x, train.y, clients, ids,
                                                 epochs=TINY.local_epochs, log=log)
  one_round()
  one_round()
  k = TINY.clients_per_round
  for r in range(2):
    trained = log[r * k:(r + 1) * k]
    assert [c for c, _, _ in trained] == ids[r].tolist()
    assert [n for _, n, _ in trained] == sizes[ids[r]].tolist()
    assert sum(s for _, _, s in trained) == rw.real_steps(sizes[ids[r]], 64, TINY.local_epochs)

