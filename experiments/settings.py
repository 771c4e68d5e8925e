r"""Lists what a run can be made of, and any section of the config with what it allows.

  python -m experiments.settings              # algorithms, datasets, models, config files
                                              # and their preset words, sections
  python -m experiments.settings fl.fedprox   # each setting: default, allowed values, and
                                              # where the default comes from (the paper)
  python -m experiments.settings isr --config=experiments/configs/digits.py:fl,isr
                                              # the values as that preset sets them

What is allowed is what the config's checks refuse (:mod:`isr_jax.settings_catalog`),
so the listing says what a run would say. A mistake is one ``error: ...`` line
and exit code 1.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import textwrap

from experiments.config_files import config_files, load_config, load_module
from isr_jax.config import default_config
from isr_jax.config_names import RENAMED_SETTINGS
from isr_jax.data import DATASETS
from isr_jax.data.datasets import dataset_source
from isr_jax.errors import ConfigError
from isr_jax.fl.channel.spec import SECTIONS as CHANNEL_SECTIONS
from isr_jax.fl.registry import ALGORITHMS
from isr_jax.models import MODELS
from isr_jax.settings_catalog import algorithm_citation, describe, section_note

_WIDTH = 100


def _first_line(text: str | None) -> str:
  """The first paragraph of a docstring, on one line of at most ~80 characters."""
  paragraph = " ".join((text or "").strip().split("\n\n")[0].split())
  return textwrap.shorten(paragraph, 84, placeholder=" ...")


def _wrapped(text: str, indent: str) -> str:
  return textwrap.fill(text, _WIDTH, initial_indent=indent, subsequent_indent=indent)


def _config_file_lines(path: str) -> list[str]:
  """``path``, its preset words and default, and the first line of its docstring."""
  try:
    module = load_module(path)
  except ConfigError as e:
    return [f"  {path}: cannot be read ({e})"]
  words = " ".join(getattr(module, "WORDS", ())) or "(none)"
  default = inspect.signature(module.get_config).parameters
  default = next((p.default for p in default.values()
                  if p.default is not inspect.Parameter.empty), "")
  return [f"  {path}:<words>  words: {words}  (default: {default or 'none'})",
          _wrapped(_first_line(inspect.getdoc(module)), "      ")]


def overview() -> str:
  """Algorithms, datasets, models, config files with their preset words, and sections."""
  lines = ["algorithms (--config.fl.algorithm=NAME; settings in fl.NAME):"]
  width = max(map(len, ALGORITHMS))
  for name, entry in ALGORITHMS.items():
    cited = _first_line(inspect.getdoc(sys.modules[entry.build.__module__]))
    lines.append(f"  {name:<{width}}  {cited}")
  lines.append("datasets (--config.dataset.name=NAME):")
  width = max(map(len, DATASETS))
  lines += [f"  {name:<{width}}  {dataset_source(name)}" for name in DATASETS]
  lines.append("models (--config.model.name=NAME):")
  lines += [f"  {name:<{width}}  {cls.task}" for name, cls in sorted(MODELS.items())]
  lines.append("config files (--config=FILE:WORDS, the words comma-separated):")
  for path in config_files():
    lines += _config_file_lines(path)
  config = default_config()
  sections = sorted(k for k in config if hasattr(config[k], "keys"))
  lines.append("sections (python -m experiments.settings SECTION):")
  lines.append(_wrapped(" ".join([*sections, "fl.partition", "fl.server_optimizer",
                                  *(f"fl.{name}" for name in CHANNEL_SECTIONS), "fl.population",
                                  "fl.ALGORITHM"]), "  "))
  lines.append("renamed settings (old name -> name now):")
  lines += [f"  {old} -> {new}" for old, new in RENAMED_SETTINGS.items()]
  return "\n".join(lines)


def section(config, prefix: str) -> str:
  """Each setting under ``prefix``: value, allowed values, and the note on its default."""
  rows = describe(config, prefix)
  lines = []
  note = section_note(prefix)
  if note:
    lines.append(_wrapped(note, "# "))
  if not rows or all(r.value == {} and not r.allowed for r in rows):
    parts = prefix.split(".")
    if len(parts) == 2 and parts[1] in ALGORITHMS:
      lines.append(f"{prefix}: no settings")
      if not note:
        lines.append(_wrapped(algorithm_citation(parts[1]), "# "))
      return "\n".join(lines)
  width = max(len(r.name) for r in rows)
  for r in rows:
    allowed = r.allowed or "not checked before the run"
    lines.append(f"{r.name:<{width}}  = {r.value!r:<12}  {allowed}")
    if r.note:
      lines.append(_wrapped(r.note, " " * (width + 4) + "# "))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.settings",
      description="Lists algorithms, datasets, models, config files and their presets; "
                  "with SECTION, every setting under it with its default and allowed values.")
  parser.add_argument("section", nargs="?", help="a section or setting, e.g. fl.fedprox")
  parser.add_argument("--config", help="FILE[:WORDS]: show that preset's values, not the "
                      "library's defaults")
  args = parser.parse_args(argv)
  try:
    if args.section is None and args.config is None:
      print(overview())
      return 0
    config = load_config(args.config) if args.config else default_config()
    print(section(config, args.section or ""))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
