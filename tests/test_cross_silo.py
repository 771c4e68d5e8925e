"""The cross-silo Fashion-MNIST benchmark: its preset, partitions and driver."""

import csv
import gzip
import json
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from support import driver_env

from experiments import cross_silo_table as driver
from experiments.configs import cross_silo
from isr_jax.data import partition
from isr_jax.models import create_model

REPO = str(__import__("pathlib").Path(__file__).parents[1])


def test_preset_is_the_literature_setting():
  c = cross_silo.get_config("dirichlet")
  assert (c.fl.num_clients, c.fl.clients_per_round, c.fl.local_epochs) == (10, 10, 10)
  assert (c.dataset.batch_size, c.dataset.standardize) == (64, False)
  opt = c.client_optimizer
  assert (opt.name, opt.learning_rate, opt.momentum, opt.weight_decay) == ("sgd", 0.01, 0.9, 1e-5)
  assert (c.fl.partition.method, c.fl.partition.dirichlet_alpha) == ("dirichlet", 0.5)
  c2 = cross_silo.get_config("classes2")
  assert (c2.fl.partition.method, c2.fl.partition.classes_per_client) == ("pathological", 2)
  with pytest.raises(ValueError, match="dirichlet"):
    cross_silo.get_config("dirichlet,classes2")


def test_preset_model_has_the_benchmarks_parameter_count():
  model = create_model("lenet5", num_classes=10, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  # conv1 5·5·1·6+6, conv2 5·5·6·16+16, fc 400·120+120, 120·84+84, 84·10+10.
  expected = 156 + 2416 + 48120 + 10164 + 850
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert sum(x.size for x in params) == expected == 61_706


def test_two_classes_per_party_split_evenly_among_holders():
  labels = np.repeat(np.arange(10), 600)
  clients = partition(labels, 10, "pathological", seed=0, classes_per_client=2)
  held = [set(labels[c]) for c in clients]
  assert all(len(h) == 2 for h in held)
  for k in range(10):
    holders = [c for c, h in zip(clients, held, strict=True) if k in h]
    counts = [int(np.sum(labels[c] == k)) for c in holders]
    assert sum(counts) == 600 and max(counts) - min(counts) <= 1, (k, counts)


def test_run_entries_are_checked():
  assert driver.parse_run("classes2:fedprox:3") == ("classes2", "fedprox", 3)
  for bad in ("dirichlet:fedavg", "iid:fedavg:0", "dirichlet:fedfoo:0", "dirichlet:fedavg:-1"):
    with pytest.raises(ValueError, match="skew:algorithm:seed"):
      driver.parse_run(bad)


def test_summary_of_a_workdir(tmp_path):
  records = [{"round": 1, "time/round_s": 30.0, "test/accuracy": 0.70},
             {"round": 2, "time/round_s": 10.0, "test/accuracy": 0.85},
             {"round": 3, "time/round_s": 20.0, "test/accuracy": 0.80}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  s = driver.summarize_run(str(tmp_path))
  assert s == {"rounds": 3, "best_accuracy": 0.85, "best_round": 2, "final_accuracy": 0.80,
               "round_s": 20.0}
  row = {"skew": "dirichlet", "algorithm": "fedavg", "seed": 0, **s}
  assert "| Dir(0.5) | fedavg | 0 | 3 | 85.00 % (2) | 80.00 % | 86.1 % | 20.0 |" in (
      driver.format_markdown([row]))
  empty = driver.summarize_run(str(tmp_path / "never_ran"))
  assert empty["rounds"] == 0 and np.isnan(empty["best_accuracy"])


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.slow
def test_driver_end_to_end_on_small_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  data = tmp_path / "fmnist"
  data.mkdir()
  for prefix, n in (("train", 80), ("t10k", 20)):
    _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
    _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
  work = tmp_path / "runs"
  cmd = [sys.executable, "-m", "experiments.cross_silo", f"--workdir={work}", "--local",
         "--rounds=2", f"--data_dir={data}", "--runs=classes2:fedavg:0,dirichlet:fedprox:1"]
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                        env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(work / "cross_silo.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["skew"], r["algorithm"], r["seed"], r["rounds"]) for r in rows] == [
      ("classes2", "fedavg", "0", "2"), ("dirichlet", "fedprox", "1", "2")]
  assert all(0.0 <= float(r["final_accuracy"]) <= 1.0 for r in rows)
  assert (work / "c2_fedavg_s0" / "metrics.jsonl").exists()
  assert "| #C = 2 | fedavg | 0 | 2 |" in (work / "cross_silo.md").read_text()
