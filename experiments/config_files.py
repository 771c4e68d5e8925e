"""Config files and ``--config.<setting>=<value>`` overrides, read with one-line errors.

ml_collections' ``config_flags`` reads them too, but answers a missing file, a
syntax error, a bad preset word or a value of the wrong type with a traceback
or a line about its own internals; the drivers check the command line here
first, so every such mistake is one :class:`ConfigError` line naming the file
or the setting and what is allowed.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import re
import sys

import ml_collections
from absl import flags

from isr_jax.config_names import has_setting, no_setting_message
from isr_jax.errors import ConfigError
from isr_jax.settings_catalog import rejection

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def config_files() -> list[str]:
  """The experiment config files shipped in ``experiments/configs/``, as relative paths."""
  return sorted(os.path.relpath(p) for p in glob.glob(os.path.join(CONFIG_DIR, "[!_]*.py")))


def load_module(path: str):
  """The Python file at ``path`` as a module; a one-line ConfigError if it cannot be run."""
  if not os.path.isfile(path):
    where = os.path.dirname(path) or "."
    shown = [os.path.basename(p) for p in glob.glob(os.path.join(where, "*.py"))
             if not os.path.basename(p).startswith("_")]
    known = f"; {where} has {', '.join(sorted(shown))}" if shown else ""
    raise ConfigError(f"{path}: no such file{known}")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  except Exception as e:  # an import or a name the file got wrong: its own line
    line = _line_in(path, sys.exc_info()[2])
    raise ConfigError(f"{path}{line}: {type(e).__name__}: {e}") from None
  return module


def _line_in(path: str, tb) -> str:
  """``":<line>"`` of the deepest frame of ``tb`` inside ``path``, or ``""``."""
  line = ""
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = f":{tb.tb_lineno}"
    tb = tb.tb_next
  return line


def load_python_file(spec: str, function: str):
  """``<path>[:<argument>]`` -> ``module.<function>(argument)`` (the argument may be absent).

  Raises:
    ConfigError: one line for a missing file, a file that does not run, no
      ``function`` in it, or its refusal of the argument (an unknown preset word).
  """
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not callable(getattr(module, function, None)):
    raise ConfigError(f"{path} defines no {function}(): is it an experiments/configs file?")
  try:
    return getattr(module, function)(arg) if arg else getattr(module, function)()
  except ValueError as e:  # the file's own check of its argument (ConfigError is one)
    raise ConfigError(f"{spec}: {' '.join(str(e).split())}") from None


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of ``<path>[:<preset words>]``, checked to be one."""
  config = load_python_file(spec, "get_config")
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{spec}: get_config() returned a {type(config).__name__}, not a "
                      "ConfigDict")
  return config


def config_argument(argv: list[str], flag: str = "config") -> str | None:
  """The value of ``--<flag>=...`` (or ``--<flag> ...``) in ``argv``, the last one given."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{flag}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def overrides(argv: list[str], flag: str = "config") -> list[tuple[str, str | None]]:
  """``(setting, value)`` of every ``--<flag>.<setting>[=<value>]`` in ``argv``."""
  out = []
  for arg in argv:
    if arg.startswith(f"--{flag}."):
      name, eq, value = arg[len(flag) + 3:].partition("=")
      out.append((name, value if eq else None))
  return out


def check_command_line(argv: list[str], flag: str = "config") -> ml_collections.ConfigDict | None:
  """Loads ``--<flag>``'s file and checks that every override names a setting of it.

  Returns the loaded config (None when the flag is absent: absl says so).
  """
  spec = config_argument(argv, flag)
  if spec is None:
    return None
  config = load_config(spec)
  for name, _ in overrides(argv, flag):
    if not has_setting(config, name):
      raise ConfigError(f"--{flag}.{name}: {no_setting_message(config, name)}")
  return config


def bad_value_message(config: ml_collections.ConfigDict, name: str, raw: str) -> str:
  """One line for an override whose value the flag parser refused (``num_rounds=3.5``).

  The line is the config check's own (what is allowed) when it refuses the value
  too, else the type the setting holds.
  """
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  refused = rejection(config, name, value)
  if refused:
    return refused
  node = config
  for part in name.split("."):
    node = node[part]
  return f"{name}={raw!r} is not a {type(node).__name__} (as {name}={node!r} is)"


def flag_error_message(config: ml_collections.ConfigDict | None, message: str) -> str:
  """absl's one-line error for a ``--config.<setting>=<value>`` it refused, made specific."""
  found = re.match(r"flag --config\.([\w.]+)=(.*?): ", message)
  if config is None or found is None or not has_setting(config, found.group(1)):
    return message
  return bad_value_message(config, found.group(1), found.group(2))


def _unknown_setting(argv: list[str], e: Exception) -> str:
  """One line for ml_collections' error on ``--config.<path>`` naming no setting.

  Its message is a repr of a KeyError inside an AttributeError, with the
  "did you mean" on a line of its own; the override is found in ``argv``.
  """
  text = str(e).replace("\\n", " ").replace("\\'", "'")
  name = re.search(r"'(\w+)'", text)
  name = name.group(1) if name else "?"
  flag = next((a.split("=")[0] for a in argv[1:]
               if a.startswith("--config.") and f".{name}" in a.split("=")[0]), "--config")
  guess = re.search(r'Did you mean "(\w+)"', text)
  hint = f"; did you mean {guess.group(1)!r}?" if guess else ""
  return f"{flag}: the config has no setting {name!r}{hint}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for a driver with ``--config``, every failure as one ``error:`` line
  (``app.run(main, flags_parser=parse_flags)``).

  The config file and the settings its overrides name are checked first
  (:func:`check_command_line`), so that a missing file, a bad preset word
  or an unknown setting is answered in its own words, not ml_collections'.
  """
  try:
    loaded = check_command_line(argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {flag_error_message(loaded, ' '.join(str(e).split()))}")
  except (AttributeError, KeyError) as e:  # an override naming no setting
    sys.exit(f"error: {_unknown_setting(argv, e)}")
  if len(rest) > 1:
    sys.exit(f"error: unexpected argument {rest[1]!r}: settings are flags, "
             "--config.<setting>=<value> ('python -m experiments.settings' lists them)")
  return rest
