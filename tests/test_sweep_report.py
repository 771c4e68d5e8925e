"""Sweeps, run records, intervals and the report that rebuilds RESULTS.md's blocks."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats
from support import driver_env

from experiments import report
from experiments.records import finished_records, read_records
from experiments.sections import BUILDERS
from experiments.sections.demo import format_table
from experiments.stats import mean_interval, paired_difference
from experiments.sweeps import Grid, Sweep, axis, expand
from isr_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(__file__))


def test_mean_interval_is_students_t():
  iv = mean_interval([0.80, 0.82, 0.87])
  s = np.std([0.80, 0.82, 0.87], ddof=1)
  assert iv.n == 3
  np.testing.assert_allclose(iv.mean, 0.83)
  np.testing.assert_allclose(iv.half_width, scipy_stats.t.ppf(0.975, 2) * s / math.sqrt(3))
  np.testing.assert_allclose(scipy_stats.t.ppf(0.975, 2), 4.302652729911275)
  one = mean_interval([0.5])
  assert one.n == 1 and math.isnan(one.half_width) and one.format(100) == "50.00 (n = 1)"
  assert mean_interval([]).n == 0 and mean_interval([float("nan"), None]).n == 0


def test_paired_difference_uses_shared_seeds_only():
  a = {0: 0.9, 1: 0.8, 2: 0.7, 5: 0.1}
  b = {0: 0.85, 1: 0.78, 2: 0.66}
  d = paired_difference(a, b)
  assert d.n == 3
  np.testing.assert_allclose(d.mean, np.mean([0.05, 0.02, 0.04]))
  # t(0.975, 2) = 4.30: three seeds do not resolve a 3.7-point difference with this spread.
  assert not d.excludes_zero and d.format(100, signed=True).startswith("+3.67 ± 3.79")
  assert paired_difference({0: 0.9, 1: 0.8, 2: 0.7}, {0: 0.85, 1: 0.75, 2: 0.66}).excludes_zero


def test_expand_is_the_product_of_axes_times_seeds():
  sweep = Sweep("s", [
      Grid("g", "cfg.py:a", [axis("x", setting="p.x", options=(1, 2)),
                             axis("y", {"on": {"q": True, "r": 1}, "off": {"q": False}})],
           seeds=(0, 1), settings={"common": 3}),
      Grid("h", "cfg.py:b", [axis("x", setting="p.x", options=(-0.5,))], seeds=(7,)),
  ])
  runs = expand(sweep)
  assert [r.name for r in runs] == [
      "g-1-on-seed0", "g-1-off-seed0", "g-2-on-seed0", "g-2-off-seed0",
      "g-1-on-seed1", "g-1-off-seed1", "g-2-on-seed1", "g-2-off-seed1", "h-m0.5-seed7"]
  assert runs[0].settings == {"common": 3, "p.x": 1, "q": True, "r": 1}
  assert runs[0].labels == {"grid": "g", "x": "1", "y": "on"}
  assert [r.seed for r in expand(sweep, seeds=[4])] == [4] * 5
  with pytest.raises(ValueError, match="label"):
    axis("x", {"a-b": {}})
  with pytest.raises(ValueError, match="different settings"):
    expand(Sweep("s", [Grid("g", "c", [axis("x", {"a": {"k": 1}})]),
                       Grid("g", "c", [axis("x", {"a": {"k": 2}})])]))


def run_sweep(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.sweep", *args], cwd=REPO, env=driver_env(),
      capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
  """Two CL runs of the isr_gap sweep's local variant, one epoch each."""
  workdir = str(tmp_path_factory.mktemp("sweep"))
  args = ["--sweep=experiments/sweeps/isr_gap.py:local", f"--workdir={workdir}",
          "--only=^cl-(none|dec0.1)-", "--set=num_rounds=1"]
  first = run_sweep(*args)
  assert first.returncode == 0, first.stderr[-2000:]
  return workdir, args, first


def test_sweep_trains_records_and_resumes(small_sweep):
  workdir, args, first = small_sweep
  assert "[1/2] cl-none-seed0 … test accuracy " in first.stdout
  assert "2/24 runs done" in first.stdout
  records = read_records(os.path.join(workdir, "results.jsonl"))
  assert len(records) == 24  # every run of the sweep has a record; the others are missing
  done = {r["name"]: r for r in records if r["status"] == "done"}
  assert set(done) == {"cl-none-seed0", "cl-dec0.1-seed0"}
  rec = done["cl-dec0.1-seed0"]
  assert rec["labels"] == {"grid": "cl", "isr": "dec0.1"}
  assert rec["settings"]["isr.mi_weight"] == 0.1
  assert 0 < rec["final"]["test/accuracy"] <= 1 and rec["round"] == 1
  assert {"train/mi_accuracy/conv1", "train/mi_accuracy/conv2"} <= set(rec["final"])
  assert rec["machine"]["cores"] == os.cpu_count() and rec["command"].startswith(
      "python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py:local")
  assert "--only=" in rec["command"] and "--shard" not in rec["command"]
  assert os.path.exists(os.path.join(workdir, "results.csv"))
  again = run_sweep(*args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.count("finished earlier, reused") == 2


def test_prior_records_continue_a_sweep_elsewhere(small_sweep, tmp_path):
  """A fresh workdir given the committed records trains none of the runs they hold as done."""
  workdir, args, _ = small_sweep
  committed = os.path.join(workdir, "results.jsonl")
  elsewhere = [a for a in args if not a.startswith("--workdir")]
  out = run_sweep(*elsewhere, f"--workdir={tmp_path}", f"--prior_records={committed}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "2 runs already done in the prior records" in out.stdout
  assert "test accuracy" not in out.stdout and "2/24 runs done" in out.stdout
  before = {r["name"]: r for r in read_records(committed) if r["status"] == "done"}
  after = {r["name"]: r for r in read_records(str(tmp_path)) if r["status"] == "done"}
  assert after.keys() == before.keys()
  assert all(after[n]["final"] == before[n]["final"] for n in before)
  # A record of the same run name under other settings or another seed is not that run.
  runs = [{"name": n, "seed": r["seed"], "settings": r["settings"]} for n, r in before.items()]
  changed = [{**before["cl-none-seed0"], "settings": {"num_rounds": 2}},
             {**before["cl-dec0.1-seed0"], "seed": 5}]
  assert finished_records(changed, runs) == {}
  assert finished_records(before.values(), runs).keys() == before.keys()
  missing = run_sweep(*elsewhere, f"--workdir={tmp_path}", "--prior_records=/no/such.jsonl")
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines()[-1].startswith(
      "error: --prior_records=/no/such.jsonl: not a readable results.jsonl")


@pytest.mark.parametrize("args, message", [
    (["--set=isr.nope=1"], "run cl-none-seed0: the config has no setting 'isr.nope'"),
    (["--set=num_rounds=1.5"], "num_rounds"),
    (["--shard=2/2"], "--shard='2/2': write i/n with 0 <= i < n"),
    (["--sweep=experiments/sweeps/nothere.py"], "experiments/sweeps/nothere.py: no such file"),
])
def test_sweep_mistakes_are_one_line_before_anything_trains(tmp_path, args, message):
  base = {"--sweep": "--sweep=experiments/sweeps/isr_gap.py:local"}
  flags = [a for a in args if a.startswith("--sweep")] or [base["--sweep"]]
  out = run_sweep(*flags, *[a for a in args if not a.startswith("--sweep")],
                  f"--workdir={tmp_path}", "--only=^cl-none-")
  assert out.returncode == 1
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "cl-none-seed0"))


def test_adhoc_axis_sweep_dry_run(tmp_path):
  out = run_sweep("--config=experiments/configs/isr_gap.py:fl,local",
                  "--axis=isr.mi_weight=0.03,0.3", "--set=isr.enabled=True", "--seeds=0,1",
                  "--name=alpha", f"--workdir={tmp_path}", "--dry_run")
  assert out.returncode == 0, out.stderr
  names = [line.split()[0] for line in out.stdout.splitlines()[:-1]]
  assert names == ["alpha-0.03-seed0", "alpha-0.3-seed0", "alpha-0.03-seed1", "alpha-0.3-seed1"]
  assert json.loads(out.stdout.splitlines()[0].split(" ", 1)[1]) == {
      "isr.enabled": True, "isr.mi_weight": 0.03}


def test_report_fills_blocks_checks_and_leaves_prose(small_sweep, tmp_path):
  workdir, _, _ = small_sweep
  by_sweep = report.load([workdir], [])
  assert set(by_sweep) == {"isr_gap_local"}  # a smoke sweep never shares a real one's name
  blocks = report.build_blocks(by_sweep, str(tmp_path / "figures"))
  name = "isr_gap_local"
  assert {f"{name}/{b}" for b in ("setup", "accuracy", "gap", "adapters", "figure")} <= set(blocks)
  assert "| decoupled, α = 0.1 |" in blocks[f"{name}/accuracy"]
  assert "2 of 24 runs finished (22 unfinished)" in blocks[f"{name}/setup"]
  assert os.path.exists(tmp_path / "figures" / f"{name}_fl_accuracy.png")
  text = (f"# Results\nprose before\n<!-- report:{name}/accuracy -->\nold 99.9\n"
          f"<!-- /report:{name}/accuracy -->\nprose after\n<!-- report:other -->\nkept\n"
          "<!-- /report:other -->\n")
  new, used, unplaced = report.fill(text, blocks)
  assert used == [f"{name}/accuracy"] and f"{name}/gap" in unplaced
  assert "old 99.9" not in new and "prose before" in new and "prose after" in new
  assert "<!-- report:other -->\nkept\n" in new
  assert report.fill(new, blocks)[0] == new  # idempotent

  out = tmp_path / "RESULTS.md"
  common = [f"--workdirs={workdir}", "--results=", f"--out={out}",
            f"--figures={tmp_path / 'figures'}"]

  def check():
    return subprocess.run([sys.executable, "-m", "experiments.report", *common, "--check"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)

  out.write_text(new)
  empty = check()  # the "other" marker: no records fill it
  assert empty.returncode == 1 and "1 markers that no records fill (other)" in empty.stderr
  out.write_text(new.replace("<!-- report:other -->\nkept\n<!-- /report:other -->\n", ""))
  assert check().returncode == 0
  out.write_text(out.read_text().replace("| CL |", "| CL typed by hand |"))
  stale = check()
  assert stale.returncode == 1 and "is stale" in stale.stderr


def test_every_report_kind_of_every_sweep_file_has_a_builder():
  import importlib

  for name in ("isr_gap", "fedaims", "fedsol", "zoo"):
    module = importlib.import_module(f"experiments.sweeps.{name}")
    assert module.get_sweep("local").report in BUILDERS
  assert importlib.import_module("experiments.sweeps.isr_gap").get_sweep(
      "taps,local").report in BUILDERS
  demo = importlib.import_module("experiments.sweeps.demo").get_sweep()
  assert demo.report in BUILDERS and len(expand(demo)) == 18


def test_committed_results_md_matches_the_committed_records():
  """No number inside a report block of experiments/RESULTS.md is typed by hand."""
  out = subprocess.run([sys.executable, "-m", "experiments.report", "--check"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr + out.stdout


def _acc(cl_off, cl_on, fl_off, fl_on):
  return {("cl", False): dict(enumerate(cl_off)), ("cl", True): dict(enumerate(cl_on)),
          ("fl", False): dict(enumerate(fl_off)), ("fl", True): dict(enumerate(fl_on)),
          ("hybrid", False): dict(enumerate(fl_off)), ("hybrid", True): dict(enumerate(fl_on))}


def test_demo_table_shows_intervals_first_and_flags_a_gap_shrunk_by_both_falling():
  text = format_table(_acc([0.98, 0.97, 0.98], [0.90, 0.91, 0.92], [0.95, 0.95, 0.96],
                           [0.93, 0.92, 0.93]), num_test=360)
  first = text.splitlines()[2]
  assert first.startswith("| CL | 97.67 ± ") and "| -6.67 ± " in first
  assert "**both ends fell**" in text and "relative +" in text
  fine = format_table(_acc([0.98, 0.97, 0.98], [0.98, 0.97, 0.98], [0.90, 0.91, 0.90],
                           [0.94, 0.95, 0.94]), num_test=360)
  assert "fell" not in fine and "shrink D_without − D_with +4.00 ± " in fine


def fake_record(sweep, report, labels, seed, final, **extra):
  """A record as experiments.records writes it, with made-up (synthetic) numbers: the
  last-three-evaluations mean is 1 point below the final round, the best 2 above."""
  accuracies = ("test/accuracy", "personal/accuracy_mean")
  return {"sweep": sweep, "report": report, "command": f"python -m experiments.sweep {sweep}",
          "name": "-".join([*labels.values(), f"seed{seed}"]), "labels": labels, "seed": seed,
          "settings": {}, "status": "done", "round": 5, "final": final,
          "best": {k: v + 0.02 for k, v in final.items() if k in accuracies},
          "late": {k: v - 0.01 for k, v in final.items() if k in accuracies},
          "curve": [{"round": 5, **final}],
          "machine": {"device": "synthetic CPU", "cores": 2, "jax": "0", "date": "2026-12-06"},
          **extra}


def test_section_builders_on_synthetic_records(tmp_path):
  rng = np.random.default_rng(0)
  fedsol = [fake_record("fedsol", "fedsol", {"grid": skew, "method": m}, s,
                        {"test/accuracy": 0.7 + 0.05 * (m == "fedsol") + 0.01 * rng.random()},
                        flatness={"top_hessian_eigenvalue": 10.0 - 3 * (m == "fedsol") + s})
            for skew in ("dir01", "s2") for m in ("fedavg", "fedsol") for s in (0, 1, 2)]
  blocks = BUILDERS["fedsol"](fedsol, str(tmp_path))
  row = next(line for line in blocks["fedsol/table"].splitlines() if "| FedAvg |" in line)
  late, diff, final, best, eigenvalue = row.split(" | ")[2:7]
  assert row.startswith("| Dir(0.1) | FedAvg | 69.") and diff.startswith("-5.")
  assert final.startswith("70.") and best.startswith("72.") and eigenvalue == "11.0 ± 2.5 |"
  assert "12 of 12 runs finished" in blocks["fedsol/setup"]

  pfl = [fake_record("fedaims_dir03", "personalized", {"grid": "dir03", "method": m}, s,
                     {"personal/accuracy_mean": 0.80 + 0.02 * (m == "fedaims") + 0.001 * s,
                      "personal/accuracy_std": 0.1, "test/accuracy": 0.6})
         for m in ("fedaims", "fedper") for s in (0, 1, 2)]
  table = BUILDERS["personalized"](pfl, str(tmp_path))["fedaims_dir03/table"]
  assert ("| Dir(0.3) | FedPer | 80.10 ± 0.25 | 79.10 ± 0.25 | -2.00 ± 0.00 | 82.10 ± 0.25 |"
          in table)
  assert "80.00, 80.10, 80.20" in table

  zoo = [fake_record("zoo", "zoo", {"grid": "digits", "algorithm": a, "isr": i}, s,
                     {f"test/{m}": 0.9 + 0.01 * (i == "on") * (a == "fedprox") + 0.001 * s
                      for m in ("accuracy", "mF1", "mPre", "mRec")}
                     | {"comm/up_bytes": 1e6, "comm/down_bytes": 2e6})
         for a in ("fedavg", "fedprox") for i in ("off", "on") for s in (0, 1)]
  z = BUILDERS["zoo"](zoo, str(tmp_path))
  assert "| fedprox | 90.05 ± 0.64 | 91.05 ± 0.64 | +1.00 ± 0.00 |" in z["zoo/table"]
  assert "**4/8**" in z["zoo/summary"] and "higher with ISR for fedprox" in z["zoo/summary"]

  taps = [fake_record("isr_taps_a0.1", "isr_taps", {"grid": "a0.1", "taps": t}, s,
                      {"test/accuracy": 0.70 - 0.02 * (t == "middle1") + 0.001 * s,
                       **({"train/mi_accuracy/conv2": 0.75} if t != "none" else {})})
          for t in ("none", "middle1") for s in (0, 1)]
  t = BUILDERS["isr_taps"](taps, str(tmp_path))["isr_taps_a0.1/table"].splitlines()
  assert t[2] == "| no ISR | 69.05 ± 0.64 | – | – |"
  assert t[3] == "| middle1 | 67.05 ± 0.64 | -2.00 ± 0.00 | `conv2` 75.00 ± 0.00 |"


def test_isr_gap_tables_on_synthetic_records(tmp_path):
  """CL 90 % everywhere; FL 70 % without ISR, 72 % with it (seed by seed), CL with ISR 89 %:
  the gap shrinks by 3 points, FL rose, and the table says so."""
  records = []
  for s in (0, 1, 2):
    for v, cl, fl in (("none", 0.90, 0.70), ("dec0.1", 0.89, 0.72)):
      records.append(fake_record("isr_gap", "isr_gap", {"grid": "cl", "isr": v}, s,
                                 {"test/accuracy": cl + 0.001 * s}))
      records.append(fake_record("isr_gap", "isr_gap", {"grid": "fl", "skew": "c2", "isr": v},
                                 s, {"test/accuracy": fl + 0.002 * s}))
  blocks = BUILDERS["isr_gap"](records, str(tmp_path))
  assert "| no ISR | 89.10 ± 0.25 | 69.20 ± 0.50 |" in blocks["isr_gap/accuracy"]
  assert "| no ISR | 90.10 ± 0.25 | 70.20 ± 0.50 |" in blocks["isr_gap/accuracy_final"]
  row = next(line for line in blocks["isr_gap/gap"].splitlines() if "decoupled" in line)
  assert row == ("| #C = 2 | decoupled, α = 0.1 | 16.90 ± 0.25 | +3.00 ± 0.00 | -1.00 ± 0.00 | "
                 "+2.00 ± 0.00 | shrank, FL rose |")
  assert blocks["isr_gap/findings"] == (
      "- #C = 2, decoupled, α = 0.1: the gap shrinks by 3.00 ± 0.00 points (CL -1.00 ± 0.00, "
      "FL +2.00 ± 0.00): shrank, FL rose.")


def test_runner_marks_a_diverged_run_skips_it_and_retries_on_request(tmp_path, monkeypatch,
                                                                     capsys):
  from experiments.sweeps import runner

  sweep = Sweep("s", [Grid("g", "unused", [axis("x", setting="p", options=(1, 2))])])
  runs = expand(sweep)
  calls = []

  def fake_train(config, workdir, label):
    calls.append(config)
    os.makedirs(workdir, exist_ok=True)  # as train_and_evaluate makes it before round 1
    if config == "diverges":
      return None
    return {"finished_earlier": False, "metrics": {"test/accuracy": 0.5}}

  monkeypatch.setattr(runner, "train_unless_diverged", fake_train)
  runner.train_runs(runs, ["fine", "diverges"], str(tmp_path))
  assert (tmp_path / "g-2-seed0" / "DIVERGED").exists()
  runner.train_runs(runs, ["fine", "diverges"], str(tmp_path))
  assert calls == ["fine", "diverges", "fine"]
  assert "[2/2] g-2-seed0 … diverged before; skipped (--retry_diverged" in capsys.readouterr().out
  runner.train_runs(runs, ["fine", "fine"], str(tmp_path), retry_diverged=True)
  assert not (tmp_path / "g-2-seed0" / "DIVERGED").exists()


def test_sweep_json_keeps_the_runs_of_every_process_and_refuses_a_changed_run(tmp_path):
  from experiments.sweeps import runner

  base = Sweep("s", [Grid("g", "cfg", [axis("x", setting="p", options=(1,))], seeds=(0, 1))])
  runner.write_spec(str(tmp_path), base, expand(base, [0]), "first")
  runner.write_spec(str(tmp_path), base, expand(base, [1]), "second")
  spec = json.loads((tmp_path / "sweep.json").read_text())
  assert [r["name"] for r in spec["runs"]] == ["g-1-seed0", "g-1-seed1"]
  assert spec["command"] == "second"
  changed = base._replace(grids=[base.grids[0]._replace(settings={"q": 2})])
  with pytest.raises(ConfigError, match="its run g-1-seed0 has other settings"):
    runner.write_spec(str(tmp_path), changed, expand(changed, [0]), "third")
  with pytest.raises(ConfigError, match="holds the sweep 's', not 'other'"):
    runner.write_spec(str(tmp_path), base._replace(name="other"), [], "fourth")
