"""End to end through ``train_and_evaluate``: modes, resume, bad input."""

import json
import math
import os
import shutil

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_algorithms import LENET5_DIGITS, per_client_bytes

from experiments.configs.digits import get_config
from isr_jax.config import validate
from isr_jax.errors import CheckpointError, ConfigError, NaNLossError
from isr_jax.experiment import build_experiment
from isr_jax.fl.algorithm import Batch
from isr_jax.fl.client import auto_parallelism, local_step_flops
from isr_jax.metric_writer import read_metrics
from isr_jax.models import create_model
from isr_jax.train import train_and_evaluate


def tiny(run_mode="fl", isr=False, **overrides):
  c = get_config(run_mode + (",isr" if isr else "") + ",local")
  c.model.name = "lenet5"
  c.num_rounds = 2
  c.eval_every = 1
  c.checkpoint_every = 1
  c.fl.num_clients = 6
  c.fl.clients_per_round = 3
  c.fl.local_steps = 3
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.mark.parametrize("mode", ["cl", "fl", "hybrid"])
@pytest.mark.parametrize("isr", [False, True])
def test_one_run_per_mode(tmp_path, mode, isr):
  # Long enough to learn (8 rounds; FL/hybrid: 3 clients × 20 local steps, CL: 8 epochs;
  # measured test accuracy 0.74 FL, 0.81 hybrid, 0.95 CL), still seconds after compiling.
  config = tiny(mode, isr, num_rounds=8, eval_every=4, checkpoint_every=4,
                **{"fl.local_steps": 20})
  result = train_and_evaluate(config, str(tmp_path))
  m, history = result["metrics"], result["history"]
  assert m["test/accuracy"] > 0.5  # chance: 0.1
  assert history[-1]["train/loss"] < 0.5 * history[0]["train/loss"]
  assert any(k.startswith("train/mi/") for k in m) == isr
  params = result["state"].params
  assert sum(x.size for x in jax.tree.leaves(params["model"])) == LENET5_DIGITS
  if mode == "hybrid":
    assert m["hybrid/mix_weight"] == pytest.approx(0.5)
    assert -1.0 <= m["hybrid/cos_cl_fl"] <= 1.0
  if mode != "cl":
    # Every sampled client ran its 20 steps; 3 clients × the model (+ adapters) each way.
    assert m["fl/local_steps"] == 20
    up, down = per_client_bytes("fedavg", params)
    assert (m["comm/up_bytes"], m["comm/down_bytes"]) == (3 * up, 3 * down)
  records = read_metrics(str(tmp_path))
  assert [r["round"] for r in records] == list(range(1, 9))
  assert os.path.exists(tmp_path / "checkpoints" / "8")
  with open(tmp_path / "summary.json") as f:
    assert json.load(f)["round"] == 8


def test_resume_is_exact(tmp_path):
  straight = train_and_evaluate(tiny("fl", True, num_rounds=4), str(tmp_path / "a"))
  train_and_evaluate(tiny("fl", True, num_rounds=2), str(tmp_path / "b"))
  resumed = train_and_evaluate(tiny("fl", True, num_rounds=4), str(tmp_path / "b"))
  chex.assert_trees_all_equal(straight["state"], resumed["state"])
  assert [r["round"] for r in read_metrics(str(tmp_path / "b"))] == [1, 2, 3, 4]
  assert resumed["history"][-1]["test/accuracy"] == straight["history"][-1]["test/accuracy"]


def test_resume_after_crash_drops_metrics_beyond_the_checkpoint(tmp_path):
  train_and_evaluate(tiny("cl", num_rounds=3, checkpoint_every=2), str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if killed before round 3 was saved
  train_and_evaluate(tiny("cl", num_rounds=3, checkpoint_every=2), str(tmp_path))
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]


def test_one_round_on_tfds_mock_data(tmp_path, mock_tfds):
  with mock_tfds(num_examples=120):
    result = train_and_evaluate(
        tiny("fl", True, **{"dataset.name": "mnist", "num_rounds": 1}), str(tmp_path))
  assert math.isfinite(result["metrics"]["train/loss"])
  assert result["metrics"]["test/num_examples"] == 120


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"model.name": "vgg"}, r"model\.name='vgg' is not one of \[.*'fedavg_cnn'"),
        ({"fl.algorithm": "fedfoo"}, r"fl\.algorithm='fedfoo' is not one of \[.*'fedavg'"),
        ({"dataset.name": "imagenet"}, r"dataset\.name='imagenet' is not one of \[.*'digits'"),
        ({"mode": "online"}, r"mode='online' is not one of \['cl', 'fl', 'hybrid'\]"),
        ({"isr.mi_weight": -0.5}, r"isr\.mi_weight=-0\.5 must be in \[0"),
        ({"isr.ne_weight": -1.0}, r"isr\.ne_weight=-1\.0 must be in \[0"),
        ({"hybrid.mix_weight": 1.5}, r"hybrid\.mix_weight=1\.5 must be in \[0, 1\]"),
        ({"hybrid.mix_weight": -0.1}, r"hybrid\.mix_weight=-0\.1 must be in \[0, 1\]"),
        ({"hybrid.schedule": "cosine"}, r"hybrid\.schedule='cosine' is not one of"),
        ({"fl.clients_per_round": 9}, r"fl\.clients_per_round=9 exceeds fl\.num_clients=6"),
        ({"client_optimizer.learning_rate": 0.0}, r"client_optimizer\.learning_rate=0\.0"),
        ({"fl.partition.method": "zipf"}, r"fl\.partition\.method='zipf' is not one of"),
        ({"seed": -1}, r"seed=-1 must be an integer in \[0, 4294967295\]"),
        ({"model.name": "topformer"},
         r"model\.name='topformer' is a segmentation model but dataset\.name='digits' is a "
         r"classification dataset: use one of \['convnet3'"),
        ({"dataset.name": "synthetic_streets"},
         r"model\.name='lenet5' is a classification model but dataset\.name='synthetic_streets'"),
    ],
)
def test_bad_settings_fail_before_training_with_one_line(overrides, message):
  with pytest.raises(ConfigError, match=message) as info:
    validate(tiny("hybrid", True, **overrides))
  assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"isr.taps": ("conv1", "layer9")}, r"isr\.taps: \['layer9'\] not among the model's taps"),
        ({"isr.num_taps": 5, "isr.spacing": 2}, r"isr\.num_taps=5 with isr\.spacing=2 spans 9"),
        ({"fl.partition.method": "shards", "fl.partition.shards_per_client": 400},
         r"fl\.partition\.shards_per_client"),
        ({"fl.num_clients": 5000, "fl.clients_per_round": 3}, r"fl\.num_clients=5000 exceeds"),
        ({"model.options": {"width": 3}}, r"model\.width=3 is not an option"),
        ({"fl.num_devices": 64}, r"fl\.num_devices=64 must be in \[1, \d+\]"),
    ],
)
def test_bad_settings_that_need_the_model_or_data(overrides, message):
  config = tiny("fl", True, **overrides) if "model.options" not in overrides else tiny("fl")
  if "model.options" in overrides:
    config.model.options.width = 3
  with pytest.raises(ConfigError, match=message) as info:
    build_experiment(config)
  assert "\n" not in str(info.value)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  train_and_evaluate(tiny("fl", num_rounds=2), str(tmp_path))
  # A resume may not change the learning rate; a config.json edited to the new rate
  # is what the resume compares against, which lets the rate explode here.
  exploding = tiny("fl", num_rounds=6, **{"client_optimizer.learning_rate": 1e6})
  recorded = (tmp_path / "config.json").read_text()
  (tmp_path / "config.json").write_text(exploding.to_json_best_effort(indent=2, sort_keys=True))
  with pytest.raises(NaNLossError, match=r"train/loss became (nan|inf) in round 3") as info:
    train_and_evaluate(exploding, str(tmp_path))
  message = str(info.value)
  assert "last good checkpoint (round 2) is kept" in message and "\n" not in message
  # The hint names what this run had on: its step size, and no ISR weights (ISR is off).
  assert message.endswith("lower one of client_optimizer.learning_rate=1e+06") or (
      "client_optimizer.learning_rate=1e+06" in message and "isr." not in message)
  saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert saved == [1, 2]
  records = read_metrics(str(tmp_path))
  assert [r["round"] for r in records] == [1, 2]
  # The kept checkpoint is good: a sane run resumes from it.
  (tmp_path / "config.json").write_text(recorded)
  assert train_and_evaluate(tiny("fl", num_rounds=3), str(tmp_path))["metrics"]["train/loss"] < 10


def test_no_intact_checkpoint_is_a_clear_error_and_is_left_alone(tmp_path):
  train_and_evaluate(tiny("cl", num_rounds=1), str(tmp_path))
  ckpt = tmp_path / "checkpoints" / "1"
  for root, _, files in os.walk(ckpt):
    for f in files:
      if "manifest" in f or f.startswith("_"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  before = sorted(os.listdir(ckpt))
  with pytest.raises(CheckpointError,
                     match=r"no checkpoint in .*checkpoints can be restored \(round 1: ") as info:
    train_and_evaluate(tiny("cl", num_rounds=2), str(tmp_path))
  assert "\n" not in str(info.value) and "tensorstore" not in str(info.value).lower()
  assert sorted(os.listdir(ckpt)) == before
  assert [r["round"] for r in read_metrics(str(tmp_path))] == [1]


def test_checkpoint_from_another_config_is_rejected(tmp_path):
  train_and_evaluate(tiny("fl", False, num_rounds=1), str(tmp_path))
  with pytest.raises(ConfigError, match=r"isr\.enabled: False → True"):
    train_and_evaluate(tiny("fl", True, num_rounds=2), str(tmp_path))
  # A lost config.json is written back from the config kept with the checkpoint.
  os.remove(tmp_path / "config.json")
  with pytest.raises(ConfigError, match=r"isr\.enabled: False → True"):
    train_and_evaluate(tiny("fl", True, num_rounds=2), str(tmp_path))
  assert os.path.exists(tmp_path / "config.json")


def test_main_reports_config_errors_in_one_line(tmp_path):
  import subprocess
  import sys

  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/digits.py:fl,local", f"--workdir={tmp_path}",
       "--config.fl.algorithm=fedfoo"],
      capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
      timeout=300)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: fl.algorithm='fedfoo' is not one of")
  assert np.all([not line.startswith("Traceback") for line in proc.stderr.splitlines()])


def test_auto_parallelism_chunks_dispatch_bound_steps_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is CPU's; accelerators vmap every client")
  asked = []

  def flops(value):
    return lambda: asked.append(value) or value

  # The divisor of the clients nearest (in ratio) to 150 MFLOP / step FLOPs.
  assert auto_parallelism("auto", 0, clients=100, step_flops=flops(5.4e6)) == (
      "chunked", 25)  # 27.8
  assert auto_parallelism("auto", 0, clients=100, step_flops=flops(43e6)) == (
      "chunked", 4)  # 3.5
  assert auto_parallelism("auto", 0, clients=10, step_flops=flops(1e6)) == (
      "chunked", 10)
  assert auto_parallelism("auto", 0, clients=7, step_flops=flops(20e6)) == ("chunked", 7)
  assert auto_parallelism("auto", 0, clients=100, step_flops=flops(71e6)) == (
      "sequential", 0)
  assert asked == [5.4e6, 43e6, 1e6, 20e6, 71e6]
  # Other strategies, and a single client, need no count.
  for strategy, chunk in [("sequential", 0), ("vmap", 0), ("chunked", 3)]:
    assert auto_parallelism(strategy, chunk, clients=100,
                            step_flops=flops(-1.0)) == (strategy, chunk)
  assert auto_parallelism("auto", 0, clients=1, step_flops=flops(-1.0)) == (
      "sequential", 0)
  assert len(asked) == 5


def test_local_step_flops_counts_textbook_convolutions():
  """The count is the model's arithmetic, the same whichever lowering its layers pick."""
  batch = Batch(np.zeros((16, 28, 28, 1), np.float32), np.zeros(16, np.int32),
                np.ones(16, bool))
  counts = {}
  for impl in ("auto", "banded", "im2col", "xla"):
    model = create_model("lenet5", num_classes=10, input_shape=(28, 28, 1),
                         conv_impl=impl, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, b, graphdef=graphdef):
      logits, _ = nnx.merge(graphdef, p)(b.x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, b.y).mean()

    counts[impl] = local_step_flops(loss, params, batch)
    if impl == "banded":  # the lowering itself multiplies its band's zeros
      banded = jax.jit(loss).lower(params, batch).cost_analysis()
      banded = banded[0] if isinstance(banded, list) else banded
      assert 3 * banded["flops"] > 1.2 * counts[impl]
  assert len(set(counts.values())) == 1, counts
  assert 35e6 < counts["xla"] < 45e6  # 3 × 2 × 0.42 M multiply-adds per example × 16


def test_auto_runs_a_dispatch_bound_round_chunked_with_sequentials_result():
  """LeNet-5 on 8×8 digits at batch 16 (~4 MFLOP a step) is chunked; same round as sequential."""
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is CPU's")
  params = {}
  for strategy in ("auto", "sequential"):
    config = tiny("fl", True, **{"fl.client_parallelism": strategy, "dataset.batch_size": 16})
    exp = build_experiment(config)
    if strategy == "auto":
      assert (exp.fl_spec.parallelism, exp.fl_spec.chunk_size) == ("chunked", 3)
    state, _ = exp.round_fn(exp.state, *exp.round_data)
    params[strategy] = state.params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5),
               params["auto"], params["sequential"])


def test_auto_keeps_compute_bound_rounds_sequential():
  if jax.default_backend() != "cpu":
    pytest.skip("the rule is CPU's")
  exp = build_experiment(tiny("fl", **{"model.name": "fedavg_cnn", "dataset.batch_size": 16}))
  assert (exp.fl_spec.parallelism, exp.fl_spec.chunk_size) == ("sequential", 0)
