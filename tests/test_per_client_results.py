"""Each client's personalized accuracy: personal.jsonl, a run's record, the report's table."""

import json

import numpy as np

from experiments.records import run_record
from experiments.sections.personalized import blocks, client_quantiles, client_table
from isr_jax.client_results import PER_CLIENT_FILE, PerClientWriter, read_per_client


def test_writer_keeps_the_real_clients_marks_empty_ones_and_drops_rounds_after_a_resume(
    tmp_path):
  writer = PerClientWriter(str(tmp_path), num_clients=3)
  # A sharded run pads the client rows: the fourth row is padding, 0 of 0.
  writer.write(2, np.array([3.0, 0.0, 5.0, 0.0]), np.array([4.0, 0.0, 10.0, 0.0]))
  writer.write(4, [4.0, 0.0, 6.0, 0.0], [4.0, 0.0, 10.0, 0.0])
  assert read_per_client(str(tmp_path)) == [
      {"round": 2, "accuracy": [0.75, None, 0.5], "examples": [4, 0, 10]},
      {"round": 4, "accuracy": [1.0, None, 0.6], "examples": [4, 0, 10]}]
  # Resumed from round 2's checkpoint: round 4 is evaluated again, so its line goes.
  PerClientWriter(str(tmp_path), num_clients=3, resume_round=2)
  assert [r["round"] for r in read_per_client(str(tmp_path))] == [2]
  # A line torn by a kill is dropped on reading and repaired on the next start.
  with open(tmp_path / PER_CLIENT_FILE, "a") as f:
    f.write('{"round": 4, "accur')
  assert [r["round"] for r in read_per_client(str(tmp_path))] == [2]
  PerClientWriter(str(tmp_path), num_clients=3, resume_round=4)
  assert (tmp_path / PER_CLIENT_FILE).read_text().endswith("]}\n")
  # Other processes of a multi-host job write nothing.
  PerClientWriter(str(tmp_path / "other"), num_clients=3, enabled=False).write(1, [1], [1])
  assert read_per_client(str(tmp_path / "other")) == []


def personalized_workdir(path, accuracy, examples):
  path.mkdir(parents=True)
  (path / "config.json").write_text(json.dumps({"num_rounds": 2}))
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
      {"round": 1, "train/loss": 1.0},
      {"round": 2, "train/loss": 0.5, "test/accuracy": 0.7,
       "personal/accuracy_mean": float(np.mean([a for a in accuracy if a is not None]))}]))
  writer = PerClientWriter(str(path), num_clients=len(accuracy))
  hits = [0.0 if a is None else a * n for a, n in zip(accuracy, examples, strict=True)]
  writer.write(2, hits, examples)
  return str(path)


def test_record_holds_the_last_evaluations_per_client_accuracy_and_report_tabulates_it(
    tmp_path):
  records = []
  for seed, accuracy in ((0, [0.5, 0.9, None, 0.7]), (1, [0.6, 1.0, None, 0.8])):
    workdir = personalized_workdir(tmp_path / f"s{seed}", accuracy, [10, 10, 0, 10])
    run = {"name": f"dir03-fedper-seed{seed}", "labels": {"grid": "dir03", "method": "fedper"},
           "seed": seed, "settings": {}}
    records.append({"sweep": "pfl", "report": "personalized", "command": "",
                    **run_record(workdir, run)})
  assert records[0]["status"] == "done"
  assert records[0]["per_client"] == {"round": 2, "accuracy": [0.5, 0.9, None, 0.7],
                                      "examples": [10, 10, 0, 10]}
  q = client_quantiles(records[0])
  assert (q["worst"], q["median"], q["best"], q["clients"]) == (0.5, 0.7, 0.9, 3)
  table = client_table(records)
  # Averaged over the two seeds: worst (50 + 60) / 2, median (70 + 80) / 2, best (90 + 100) / 2.
  assert "| Dir(0.3) | FedPer | 3 | 55.00 | 59.00 | 75.00 | 95.00 | 2 |" in table
  assert "pfl/clients" in blocks(records, str(tmp_path / "figures"))
  # Records without per-client accuracies (committed before personal.jsonl) add no block.
  bare = [{k: v for k, v in r.items() if k != "per_client"} for r in records]
  assert client_table(bare) == ""
