"""Config files, presets, overrides, renamed settings and resumes: one line each."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from experiments import config_files
from experiments.configs import digits, personalized, preset_words, segmentation
from experiments.sweeps import Run
from experiments.sweeps.runner import build_config
from isr_jax import workdir as workdir_files
from isr_jax.config import default_config, resume_changes, saved_config, validate
from isr_jax.config_names import RENAMED_SETTINGS, has_setting, no_setting_message
from isr_jax.errors import ConfigError
from isr_jax.fl.registry import algorithm_sections_read
from isr_jax.train import _check_resume, train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "experiments/configs/digits.py"


# ------------------------------------------------------------------------ preset words


@pytest.mark.parametrize("module, arg, message", [
    (digits, "fl,isrr", "preset word 'isrr' is not one of cl, fl, hybrid, isr, local; "
     "did you mean 'isr'?"),
    (digits, "cl,fl", "preset words 'cl' and 'fl' exclude each other: give one of cl, fl, hybrid"),
    (digits, "isr", "preset 'isr' names none of cl, fl, hybrid: give one of them"),
    (personalized, "pat2,dir01", "preset words 'pat2' and 'dir01' exclude each other"),
    (personalized, "small,local", "preset words 'small' and 'local' exclude each other"),
    (segmentation, "camvid,cityscapes", "preset words 'camvid' and 'cityscapes' exclude"),
])
def test_a_bad_preset_is_one_line_naming_the_word(module, arg, message):
  with pytest.raises(ConfigError) as info:
    module.get_config(arg)
  assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_preset_words_take_counts_and_every_config_file_lists_its_words():
  assert preset_words("pat3, isr", ("patK", "isr")) == ["pat3", "isr"]
  with pytest.raises(ConfigError, match="'pat0' is not one of"):
    preset_words("pat0", ("patK",))
  assert personalized.get_config("pat3").fl.partition.classes_per_client == 3
  for path in config_files.config_files():
    module = config_files.load_module(path)
    assert module.WORDS, path
    config_files.load_config(path)  # each file's default preset is one of its words


# ------------------------------------------------------------------------- config files


def test_config_file_mistakes_are_one_line_naming_the_file(tmp_path):
  def refused(spec):
    with pytest.raises(ConfigError) as info:
      config_files.load_config(spec)
    assert "\n" not in str(info.value)
    return str(info.value)

  assert refused("experiments/configs/digitz.py") == (
      "experiments/configs/digitz.py: no such file; experiments/configs has " +
      ", ".join(os.path.basename(p) for p in config_files.config_files()))
  (tmp_path / "syntax.py").write_text("x = 1\ndef get_config(:\n  pass\n")
  assert refused(f"{tmp_path}/syntax.py") == f"{tmp_path}/syntax.py:2: syntax error: invalid syntax"
  (tmp_path / "imports.py").write_text("import no_such_module_here\n")
  assert refused(f"{tmp_path}/imports.py") == (
      f"{tmp_path}/imports.py:1: ModuleNotFoundError: No module named 'no_such_module_here'")
  (tmp_path / "nothing.py").write_text("x = 1\n")
  assert refused(f"{tmp_path}/nothing.py") == (
      f"{tmp_path}/nothing.py defines no get_config(): is it an experiments/configs file?")
  (tmp_path / "dict.py").write_text("def get_config():\n  return {}\n")
  assert refused(f"{tmp_path}/dict.py") == (
      f"{tmp_path}/dict.py: get_config() returned a dict, not a ConfigDict")
  assert refused(f"{DIGITS}:fl,isrr").startswith(f"{DIGITS}:fl,isrr: preset word 'isrr'")


def test_overrides_naming_no_setting_point_at_the_new_name_or_the_closest():
  argv = ["main", f"--config={DIGITS}:fl", "--config.num_rounds=3"]
  assert config_files.check_command_line(argv).num_rounds == 60
  for name, hint in [("fl.partition.alpha", "; it was renamed fl.partition.dirichlet_alpha"),
                     ("isr.lam", "; it was renamed isr.ne_weight"),
                     ("fl.algoritm", "; did you mean 'algorithm'?")]:
    with pytest.raises(ConfigError) as info:
      config_files.check_command_line([*argv, f"--config.{name}=1"])
    leaf = name.rsplit(".", 1)[1]
    assert str(info.value) == f"--config.{name}: the config has no setting {leaf!r}{hint}"
  assert config_files.check_command_line(["main"]) is None  # absl says --config is required


@pytest.mark.parametrize("absl_message, line", [
    ("flag --config.num_rounds=3.5: invalid literal for int() with base 10: '3.5'",
     "num_rounds=3.5 must be an integer >= 1"),
    ("flag --config.isr.enabled=maybe: Could not parse",
     "isr.enabled='maybe' must be True or False"),
    ("flag --config.dataset.standardize=x: Could not parse",
     "dataset.standardize='x' is not a bool (as dataset.standardize=False is)"),
    ("flag --workdir: something else", "flag --workdir: something else"),
])
def test_a_value_the_flag_parser_refuses_is_said_as_the_check_says_it(absl_message, line):
  config = digits.get_config("fl")
  assert config_files.flag_error_message(config, absl_message) == line


# ml_collections registers the --config.<setting> flags from sys.argv when the
# flag is defined, so each case imports experiments.main anew: in a child forked
# from one process that has already imported everything else.
_MAIN_CASES = """
import json, os, sys
import jax
import experiments.config_files, isr_jax.train  # what experiments.main imports
out = []
for argv, env in json.loads(sys.argv[1]):
  read, write = os.pipe()
  if os.fork() == 0:
    os.environ.update(env)
    if "JAX_PLATFORMS" in env:  # read by jax when imported, above: set as it would have been
      jax.config.update("jax_platforms", env["JAX_PLATFORMS"])
    sys.argv = argv
    from experiments import main
    from experiments.config_files import parse_flags
    try:
      parse_flags(argv)
      main._check_platforms()
      message = "accepted"
    except SystemExit as e:
      message = str(e.code)
    os.write(write, message.encode())
    os._exit(0)
  os.close(write)
  os.wait()
  with os.fdopen(read) as f:
    out.append(f.read())
print(json.dumps(out))
"""


def test_main_answers_command_line_mistakes_before_anything_runs():
  config = f"--config={DIGITS}:fl"
  cases = [
      (["main", config, "--config.fl.partition.alpha=0.1"], {},
       "error: --config.fl.partition.alpha: the config has no setting 'alpha'; it was renamed "
       "fl.partition.dirichlet_alpha"),
      (["main", config, "--config.num_rounds=3.5"], {},
       "error: num_rounds=3.5 must be an integer >= 1"),
      (["main", config, "stray"], {},
       "error: unexpected argument 'stray': settings are flags, --config.<setting>=<value> "
       "('python -m experiments.settings' lists them)"),
      (["main", "--config=experiments/configs/nope.py"], {},
       "error: experiments/configs/nope.py: no such file; experiments/configs has " +
       ", ".join(os.path.basename(p) for p in config_files.config_files())),
      (["main", config, "--workdir=unused"], {"JAX_PLATFORMS": "no_such_platform"},
       "error: JAX_PLATFORMS='no_such_platform' cannot be used here (Unable to initialize "
       "backend 'no_such_platform': "),
      (["main", config, "--workdir=unused"], {}, "accepted"),
  ]
  proc = subprocess.run(
      [sys.executable, "-c", _MAIN_CASES, json.dumps([(argv, env) for argv, env, _ in cases])],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for (argv, _, expected), got in zip(cases, json.loads(proc.stdout.splitlines()[-1]),
                                       strict=True):
    assert got.startswith(expected) and "\n" not in got, (argv, got)
  assert not os.path.exists(os.path.join(REPO, "unused"))


# --------------------------------------------------------------------- renamed settings


def test_renamed_settings_are_named_wherever_a_setting_is_looked_up():
  config = default_config()
  for old, new in RENAMED_SETTINGS.items():
    assert has_setting(config, new) and not has_setting(config, old)
    assert no_setting_message(config, old).endswith(f"; it was renamed {new}")
  assert no_setting_message(config, "num_rounds.x") == (
      "the config has no setting 'x' (num_rounds is a setting, not a section)")
  # Set from Python, an old name would be ignored silently: validate names the new one.
  config.isr.alpha = 0.5
  with pytest.raises(ConfigError, match=r"^isr.alpha was renamed isr.mi_weight: set "
                                        r"isr.mi_weight instead$"):
    validate(config)
  run = Run("g-seed0", f"{DIGITS}:fl,local", {"hybrid.alpha_min": 0.1}, 0, {})
  with pytest.raises(ConfigError, match=r"^run g-seed0: the config has no setting "
                                        r"'hybrid.alpha_min'; it was renamed "
                                        r"hybrid.mix_weight_min$"):
    build_config(run)
  run = Run("g-seed0", f"{DIGITS}:fl,local", {"num_rounds": 1.5}, 0, {})
  with pytest.raises(ConfigError, match=r"^run g-seed0: num_rounds=1.5 must be an integer >= 1$"):
    build_config(run)


def test_a_config_json_saved_under_old_names_is_read_under_the_new_ones():
  config = default_config()
  saved = json.loads(config.to_json_best_effort())
  saved["isr"]["alpha"] = saved["isr"].pop("mi_weight")
  saved["fl"]["partition"]["alpha"] = saved["fl"]["partition"].pop("dirichlet_alpha")
  assert resume_changes(saved, config) == ([], False)
  rebuilt = saved_config(saved)
  assert rebuilt.isr.mi_weight == 0.1 and "alpha" not in rebuilt.isr
  assert rebuilt.fl.partition.dirichlet_alpha == 0.3
  validate(rebuilt)


# ------------------------------------------------------------------------------ resume


def _saved_run(tmp_path, config: ml_collections.ConfigDict) -> str:
  """A workdir that looks like one holding a checkpoint of ``config``'s run."""
  os.makedirs(tmp_path / "checkpoints" / "2")
  workdir_files.write_json(str(tmp_path / workdir_files.CONFIG_FILE),
                           json.loads(config.to_json_best_effort()))
  return str(tmp_path)


def test_resume_compares_only_what_the_run_reads_and_refuses_bad_values_first(tmp_path):
  config = default_config()  # FedAvg
  workdir = _saved_run(tmp_path, config)
  changed = default_config()
  changed.fl.fedprox.mu = 0.5  # FedAvg never reads it
  changed.num_rounds = 80
  assert _check_resume(changed, workdir) is True  # a safe change: config.json is rewritten
  changed.fl.fedprox.mu = -1.0
  with pytest.raises(ConfigError, match=r"^fl.fedprox.mu=-1.0 must be in \[0, inf\)$"):
    train_and_evaluate(changed, workdir)  # refused before any comparison or training
  changed.fl.fedprox.mu = 1.0
  changed.client_optimizer.learning_rate = 0.1
  with pytest.raises(ConfigError) as info:
    _check_resume(changed, workdir)
  message = str(info.value)
  assert "client_optimizer.learning_rate: 0.05 → 0.1" in message and "\n" not in message
  assert message.endswith("or train this config in another workdir") and "--" not in message


def test_a_borrowed_section_is_compared():
  config = default_config()
  config.fl.algorithm, config.fl.fedsol.proximal = "fedsol", "fedprox"
  assert algorithm_sections_read(config) == {"fedsol", "fedprox"}
  saved = json.loads(config.to_json_best_effort())
  config.fl.fedprox.mu, config.fl.moon.mu = 0.5, 5.0  # FedSoL's loss A is FedProx's term
  assert resume_changes(saved, config) == (["fl.fedprox.mu: 1.0 → 0.5"], False)


def test_only_each_sections_own_values_are_checked_for_algorithms_that_do_not_run():
  config = default_config()
  config.client_optimizer.name = "adam"  # what SCAFFOLD would refuse, were it the algorithm
  validate(config)
  config.fl.moon.tau = 0.0
  with pytest.raises(ConfigError, match=r"^fl.moon.tau=0.0 must be in"):
    validate(config)
