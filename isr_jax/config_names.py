"""Names of settings: the renamed ones, and the line for a name the config lacks.

A setting that was renamed keeps its old name here, so that a command line,
a sweep or a script written before the rename is told the new name instead of
"no such setting", and a ``config.json`` saved before it is read as that run
meant (:func:`current_names`).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from isr_jax.errors import ConfigError

# Old name -> the name that holds the same value now (one meaning per name:
# the four different alphas became the weights they are).
RENAMED_SETTINGS = {
    "isr.alpha": "isr.mi_weight",
    "isr.lam": "isr.ne_weight",
    "hybrid.alpha": "hybrid.mix_weight",
    "hybrid.alpha_min": "hybrid.mix_weight_min",
    "fl.partition.alpha": "fl.partition.dirichlet_alpha",
}


def _is_section(node) -> bool:
  return isinstance(node, (Mapping, ml_collections.ConfigDict))


def has_setting(config, name: str) -> bool:
  """Whether the dotted ``name`` is a setting (or section) of ``config``."""
  node = config
  for part in name.split("."):
    if not _is_section(node) or part not in node:
      return False
    node = node[part]
  return True


def _missing(config, name: str) -> tuple[str, list[str], object]:
  """The first missing part of ``name``, the parts found before it, and the node they reach."""
  node, walked = config, []
  for part in name.split("."):
    if not _is_section(node) or part not in node:
      return part, walked, node
    node, walked = node[part], [*walked, part]
  return name.rsplit(".", 1)[-1], walked[:-1], node


def no_setting_hint(config, name: str) -> str:
  """What follows "no setting" for the dotted ``name``: the new name of a renamed
  setting, else the closest name in the same section, else the section's settings."""
  leaf, walked, node = _missing(config, name)
  missing = ".".join([*walked, leaf])
  if missing in RENAMED_SETTINGS:
    return f"; it was renamed {RENAMED_SETTINGS[missing]}"
  if not _is_section(node):
    return f" ({'.'.join(walked)} is a setting, not a section)"
  siblings = sorted(node)
  guess = difflib.get_close_matches(leaf, siblings, n=1)
  if guess:
    return f"; did you mean {guess[0]!r}?"
  where = f"{'.'.join(walked)} has" if walked else "settings are"
  shown = ", ".join(siblings[:12]) + (", ..." if len(siblings) > 12 else "")
  return f" ({where} {shown})"


def no_setting_message(config, name: str) -> str:
  """``"the config has no setting 'x'"`` (its first missing part) with :func:`no_setting_hint`."""
  return f"the config has no setting {_missing(config, name)[0]!r}{no_setting_hint(config, name)}"


def check_no_old_names(config) -> None:
  """A ConfigError naming the new name of any renamed setting ``config`` still sets."""
  for old, new in RENAMED_SETTINGS.items():
    if has_setting(config, old):
      raise ConfigError(f"{old} was renamed {new}: set {new} instead")


def current_names(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config (nested dicts) with renamed settings moved to their current names."""
  tree = copy.deepcopy(dict(saved))
  for old, new in RENAMED_SETTINGS.items():
    if not has_setting(tree, old):
      continue
    *path, leaf = old.split(".")
    node = tree
    for part in path:
      node = node[part]
    value = node.pop(leaf)
    *path, leaf = new.split(".")
    node = tree
    for part in path:
      node = node.setdefault(part, {})
    node.setdefault(leaf, value)
  return tree
