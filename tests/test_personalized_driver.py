"""The personalized-FL driver (FedAIMS Tables 2/4, 6, 7) and its presets."""

import csv
import os
import re
import subprocess
import sys

import pytest
from support import driver_env

from experiments import personalized_tables as personalized
from experiments.configs.personalized import get_config
from isr_jax.experiment import build_experiment

REPO = os.path.dirname(os.path.dirname(__file__))


@pytest.mark.slow
def test_driver_end_to_end_writes_the_three_tables_and_the_figure(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.personalized", "--local", "--skews=pat2",
       "--methods=fedaims,fedaims_full", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=900, env=driver_env())
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "table2.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["skew"], r["round"]) for r in rows] == [
      ("fedaims", "pat2", "2"), ("fedaims_full", "pat2", "2")]
  for r in rows:
    assert 0.0 <= float(r["accuracy"]) <= float(r["best"]) <= 1.0
    assert float(r["client_std"]) > 0.0  # 10 clients on 2 classes each do not all score alike
  table2 = (tmp_path / "table2.md").read_text()
  assert re.search(r"^\| fedaims \| \d+\.\d\d ± \d+\.\d\d \|$", table2, re.MULTILINE)
  # Up: the body and the K×D prototypes with their K counts; down: body and prototypes.
  assert 0.0 < float(rows[0]["down_MB"]) < float(rows[0]["up_MB"])
  assert "| fedaims_full |" in (tmp_path / "table6.md").read_text()
  assert re.search(r"^\| pat2 \| \d+\.\d{3} s \| \d+\.\d{3} s \| -?\d+\.\d % \|$",
                   (tmp_path / "table7.md").read_text(), re.MULTILINE)
  assert (tmp_path / "personal_accuracy.png").stat().st_size > 10_000
  # Every run resumes as finished: a second call reads back and recomputes nothing.
  again = subprocess.run(
      [sys.executable, "-m", "experiments.personalized", "--local", "--skews=pat2",
       "--methods=fedaims,fedaims_full", f"--workdir={tmp_path}"],
      capture_output=True, text=True, cwd=REPO, timeout=900, env=driver_env())
  assert again.returncode == 0, again.stderr[-2000:]
  with open(tmp_path / "table2.csv") as f:
    assert list(csv.DictReader(f)) == rows


def fake_results(methods, skews):
  """Two seeds per cell with known accuracies: what the tables must average."""
  results = {}
  for i, method in enumerate(methods):
    for j, skew in enumerate(skews):
      runs = []
      for seed in (0, 1):
        acc = 0.5 + 0.1 * i + 0.01 * j + 0.02 * seed
        final = {"round": 4, personalized.ACCURACY: acc, "personal/accuracy_std": 0.1,
                 "personal/accuracy_weighted": acc}
        runs.append({"final": final, "best": final, "round_s": 1.0 + i,
                     "history": [{"round": 2, personalized.ACCURACY: acc - 0.1}, final],
                     "up": 2e6, "down": 1e6, "sigma": 2e6})
      results[(method, skew)] = runs
  return results


def test_tables_average_seeds_and_lay_out_methods_by_skew(tmp_path):
  methods, skews = ["fedaims", "fedaims_full"], ["dir03", "pat2"]
  results = fake_results(methods, skews)
  rows = personalized.summarize(results, methods, skews)
  by = {(r["method"], r["skew"]): r for r in rows}
  assert by[("fedaims_full", "pat2")]["accuracy"] == pytest.approx(0.5 + 0.1 + 0.01 + 0.01)
  assert by[("fedaims", "dir03")]["seed_std"] == pytest.approx(0.02 / 2**0.5)
  table2 = personalized.accuracy_table(rows, methods, skews, "t")
  assert "| method | dir03 | pat2 |" in table2
  assert "| fedaims_full | 61.00 ± 10.00 | 62.00 ± 10.00 |" in table2
  assert "| fedaims | 2.0000 | 1.0000 | 3.0000 | 0.750 |" in personalized.communication_table(
      rows, methods, "dir03")
  assert "| dir03 | 1.000 s | 2.000 s | 50.0 % |" in personalized.timing_table(rows, skews)
  personalized.plot(results, methods, skews, str(tmp_path / "p.png"), "t")
  assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.parametrize(("word", "dataset", "model", "num_classes"), [
    ("emnist", "emnist", "convnet3", 47),
    ("cifar10", "cifar10", "convnet4", 10),
    ("cifar100", "cifar100", "resnet18", 100),
])
def test_paper_presets_build_on_tfds_mock_data(mock_tfds, word, dataset, model, num_classes):
  c = get_config(f"{word},pat2")
  assert (c.dataset.name, c.model.name) == (dataset, model)
  assert (c.fl.partition.method, c.fl.partition.classes_per_client) == ("pathological", 2)
  c.fl.num_clients, c.fl.clients_per_round = 4, 2
  c.fl.algorithm = "fedaims"
  with mock_tfds(num_examples=64):
    exp = build_experiment(c)
  assert exp.info.num_classes == num_classes
  assert exp.state.params["model"]["head"]["kernel"].shape[-1] == num_classes


def test_bad_skew_and_method_are_one_line_usage_errors(tmp_path):
  for flag, message in (("--skews=dir05", "--skews: label skew 'dir05' is not one of"),
                        ("--methods=fedfoo", "--methods: ['fedfoo'] not among")):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.personalized", "--local", flag,
         f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1000:]
