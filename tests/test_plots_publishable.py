"""Learning-curve figures fit to publish: titles from the config, means over seeds with
bands, integer round ticks, pairs with and without ISR told apart, a legend that says so."""

import json

import numpy as np
import pytest
from matplotlib.collections import LineCollection, PolyCollection

from isr_jax import plotting
from isr_jax.plotting import mean_curve, run_title, seed_curves_figure


def records(accuracies, rounds=(5, 10)):
  return [{"round": r, "test/accuracy": a, "train/ce": 1.0 / r}
          for r, a in zip(rounds, accuracies, strict=True)]


def test_mean_curve_is_the_mean_and_sample_std_over_seeds_at_shared_rounds():
  rounds, mean, std = mean_curve([records([0.5, 0.7]), records([0.7, 0.9], rounds=(5, 10)),
                                  records([0.6], rounds=(5,))], "test/accuracy")
  assert list(rounds) == [5]  # only round 5 was logged by every seed
  np.testing.assert_allclose(mean, [0.6])
  np.testing.assert_allclose(std, [0.1])
  _, _, one = mean_curve([records([0.5, 0.7])], "test/accuracy")
  assert list(one) == [0.0, 0.0]


def test_isr_pairs_are_distinguishable_banded_and_explained():
  runs = {"FL": [records([0.5, 0.6]), records([0.52, 0.62])],
          "FL + ISR": [records([0.5, 0.6]), records([0.52, 0.62])],  # the same curves
          "HYBRID": [records([0.7, 0.8]), records([0.72, 0.82])],
          "HYBRID + ISR": [records([0.71, 0.81]), records([0.73, 0.85])]}
  fig = seed_curves_figure(runs, title="digits")
  ax = fig.axes[0]
  lines = {line.get_label(): line for line in ax.get_lines()}
  # A pair shares a hue in two shades; without ISR dashed and drawn above, so that a
  # pair whose curves coincide shows both.
  assert lines["FL"].get_linestyle() == "--" and lines["FL + ISR"].get_linestyle() == "-"
  assert lines["FL"].get_color() != lines["FL + ISR"].get_color()
  assert lines["FL"].get_zorder() > lines["FL + ISR"].get_zorder()
  assert lines["FL"].get_marker() != lines["FL + ISR"].get_marker()
  assert len({tuple(line.get_color()) for line in lines.values()}) == 4
  bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
  assert len(bands) == 4  # one ±std band per run: two seeds each
  legend = ax.get_legend()
  texts = [t.get_text() for t in legend.get_texts()]
  assert texts == ["FL", "FL + ISR", "HYBRID", "HYBRID + ISR", "solid: with ISR",
                   "dashed: without ISR"]
  assert legend.get_title().get_text() == "mean ± std over 2 seeds"
  assert list(ax.get_xticks()) == [5, 10]
  # Evaluated once: the spread over seeds as an error bar (a band would have no width).
  once = seed_curves_figure({"FL": [records([0.5], rounds=(5,)), records([0.7], rounds=(5,))]})
  (bar,) = [c for c in once.axes[0].collections if isinstance(c, LineCollection)]
  assert bar.get_segments()[0][:, 1] == pytest.approx([0.6 - 0.1414, 0.6 + 0.1414], abs=1e-3)
  assert fig._suptitle.get_text() == "digits"


def test_a_one_point_series_has_one_integer_tick_and_the_personal_band_is_across_clients():
  single = [{"round": 3, "test/accuracy": 0.8, "personal/accuracy_mean": 0.6,
             "personal/accuracy_std": 0.15},
            {"round": 4, "personal/accuracy_mean": 0.6, "personal/accuracy_std": 0.15}]
  fig = seed_curves_figure({"run": [single]},
                           metrics=("test/accuracy", "personal/accuracy_mean"))
  accuracy, personal = fig.axes[:2]
  assert list(accuracy.get_xticks()) == [3] and accuracy.get_xlim() == (2, 4)
  assert not accuracy.collections  # one seed: no band, no bar
  (band,) = [c for c in personal.collections if isinstance(c, PolyCollection)]
  ys = band.get_paths()[0].vertices[:, 1]
  assert ys.min() == pytest.approx(0.45) and ys.max() == pytest.approx(0.75)
  assert personal.get_title().endswith("± std across clients")
  assert accuracy.get_legend().get_title().get_text() == ""  # no seeds to speak of


CONFIG = {"mode": "fl", "seed": 1, "dataset": {"name": "digits"}, "model": {"name": "lenet5"},
          "isr": {"enabled": True},
          "fl": {"algorithm": "fedavg", "num_clients": 20,
                 "partition": {"method": "dirichlet", "dirichlet_alpha": 0.3}}}


def test_title_says_algorithm_dataset_and_partition():
  assert run_title(CONFIG) == ("FedAvg on digits (lenet5), Dirichlet α=0.3 over 20 clients, "
                               "ISR on")
  pat = {**CONFIG, "fl": {**CONFIG["fl"], "algorithm": "fedper",
                          "partition": {"method": "pathological", "classes_per_client": 2}}}
  assert run_title(pat) == "FedPer on digits (lenet5), 2 classes per client over 20 clients, ISR on"
  assert run_title({**CONFIG, "mode": "cl", "isr": {}}) == "centralized on digits (lenet5), ISR off"
  assert run_title({**CONFIG, "mode": "hybrid"}).startswith("hybrid CL–FedAvg on digits")
  assert run_title({}) == ""


def test_a_workdirs_figure_is_titled_from_its_config(tmp_path, monkeypatch):
  drawn = {}
  monkeypatch.setattr(plotting, "plot_learning_curves",
                      lambda runs, path, **kw: drawn.update(kw))
  for name, seed in (("a", 1), ("b", 2)):
    (tmp_path / name).mkdir()
    line = json.dumps(records([0.5], rounds=(1,))[0])
    (tmp_path / name / "metrics.jsonl").write_text(line + "\n")
    (tmp_path / name / "config.json").write_text(json.dumps({**CONFIG, "seed": seed}))
  plotting.plot_workdirs([str(tmp_path / "a")], "unused.png")
  assert drawn["title"] == run_title(CONFIG) + ", seed 1"
  plotting.plot_workdirs([str(tmp_path / "a"), str(tmp_path / "b")], "unused.png")
  assert drawn["title"] == run_title(CONFIG)  # the seeds differ; the setting is shared
  plotting.plot_workdirs([str(tmp_path / "a")], "unused.png", title="mine")
  assert drawn["title"] == "mine"
