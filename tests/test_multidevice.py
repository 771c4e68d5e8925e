"""The sharded round on 1 vs 8 devices, and 2 processes vs 1 (jax.distributed).

Device counts are fixed when JAX starts, so each configuration runs in its own
subprocess (tests/workers/run_config.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "workers", "run_config.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _run(out, workdir, mode, num_devices, host_devices, extra=(), wait=True):
  cmd = [sys.executable, WORKER, str(out), str(workdir), mode, str(num_devices), *extra]
  proc = subprocess.Popen(cmd, env=_env(host_devices), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  if wait:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
  return proc


def _params(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def _assert_same_params(a, b, atol=3e-5):
  keys = sorted(k for k in a if k.isdigit())
  assert keys and keys == sorted(k for k in b if k.isdigit())
  for k in keys:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("mode", ["fl", "hybrid"])
def test_same_result_on_1_and_8_devices(tmp_path, mode):
  _run(tmp_path / "one.npz", tmp_path / "one", mode, 1, host_devices=8)
  _run(tmp_path / "eight.npz", tmp_path / "eight", mode, 8, host_devices=8)
  one, eight = _params(tmp_path / "one.npz"), _params(tmp_path / "eight.npz")
  assert int(eight["devices"]) == 8
  _assert_same_params(one, eight)
  assert float(one["test_accuracy"]) == pytest.approx(float(eight["test_accuracy"]), abs=0.01)


def test_clients_on_the_host_train_the_sharded_round_of_clients_on_8_devices(tmp_path):
  """FedPer's rows gathered on the host and split over 8 devices each round: the run of
  the clients packed on the 8 devices, bit for bit."""
  runs = {}
  for placement in ("device", "host"):
    _run(tmp_path / f"{placement}.npz", tmp_path / placement, "hybrid", 8, host_devices=8,
         extra=["--algorithm=fedper", f"--placement={placement}"])
    runs[placement] = _params(tmp_path / f"{placement}.npz")
  assert str(runs["host"]["placement"]) == "host" and int(runs["host"]["devices"]) == 8
  _assert_same_params(runs["device"], runs["host"], atol=0)
  assert float(runs["device"]["test_accuracy"]) == float(runs["host"]["test_accuracy"])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
  """jax.distributed with 2 CPU processes × 2 devices == 1 process × 4 devices."""
  port = _free_port()
  procs = [
      _run(tmp_path / "multi.npz", tmp_path / "multi", "fl", 0, host_devices=2,
           extra=(f"--process_id={i}", "--num_processes=2", f"--port={port}"), wait=False)
      for i in range(2)
  ]
  for p in procs:
    output, _ = p.communicate(timeout=600)
    assert p.returncode == 0, output[-3000:]
  _run(tmp_path / "single.npz", tmp_path / "single", "fl", 0, host_devices=4)
  multi, single = _params(tmp_path / "multi.npz"), _params(tmp_path / "single.npz")
  assert int(multi["processes"]) == 2 and int(multi["devices"]) == 4
  assert int(single["processes"]) == 1 and int(single["devices"]) == 4
  _assert_same_params(multi, single)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "2")
