"""python -m experiments.settings: what a run can be made of, and what each setting allows."""

from __future__ import annotations

import pytest

from experiments import settings as command
from experiments.config_files import config_files, load_module
from isr_jax.config import default_config
from isr_jax.data import DATASETS
from isr_jax.fl.registry import ALGORITHMS
from isr_jax.models import MODELS
from isr_jax.settings_catalog import algorithm_citation, allowed, describe


def test_the_overview_lists_algorithms_datasets_models_and_every_presets_words(capsys):
  assert command.main([]) == 0
  out = capsys.readouterr().out
  for name in (*ALGORITHMS, *DATASETS, *MODELS):
    assert f"\n  {name} " in out, name
  assert "tfds build cifar10 --file_format=array_record" in out
  for path in config_files():
    words = " ".join(load_module(path).WORDS)
    assert f"{path}:<words>  words: {words}" in out
  assert "fl.partition.alpha -> fl.partition.dirichlet_alpha" in out


def test_a_section_shows_default_allowed_values_and_the_cited_paper(capsys):
  assert command.main(["fl.fedprox"]) == 0
  out = capsys.readouterr().out
  assert "FedProx (Li et al., MLSys 2020): μ = 1" in out
  assert "fl.fedprox.mu  = 1.0" in out and "in [0, inf)" in out
  assert command.main(["isr", "--config=experiments/configs/digits.py:fl,isr"]) == 0
  out = capsys.readouterr().out
  assert "isr.enabled             = True" in out and "MI weight α_m" in out
  assert command.main(["fl.partition.alpha"]) == 1
  assert capsys.readouterr().err.strip() == (
      "error: fl.partition.alpha: the config has no setting 'alpha'; it was renamed "
      "fl.partition.dirichlet_alpha")


@pytest.mark.parametrize("name, expected", [
    ("num_rounds", "an integer >= 1"),
    ("hybrid.cloud_fraction", "in (0, 1)"),  # checked in hybrid mode only
    ("fl.partition.method", "one of ['dirichlet', 'iid', 'natural', 'pathological', 'shards']"),
    ("fl.fedsol.proximal", "one of ['feddyn', 'fedprox', 'kl', 'moon']"),
    ("isr.enabled", "True or False"),
    ("logging.plots", ""),  # nothing checks it before the run
])
def test_allowed_values_are_what_the_checks_refuse(name, expected):
  assert allowed(default_config(), name) == expected


def test_every_algorithm_cites_where_its_defaults_come_from_and_checks_them():
  config = default_config()
  for name, entry in ALGORITHMS.items():
    assert algorithm_citation(name), name
    if entry.defaults:  # one setting each: what its settings() refuses is found
      first = sorted(entry.defaults)[0]
      assert allowed(config, f"fl.{name}.{first}"), name
  rows = describe(config, "fl.fedaims")
  assert {r.name for r in rows} == {f"fl.fedaims.{k}" for k in ALGORITHMS["fedaims"].defaults}
