"""Every setting with its default, what is allowed and where the default comes from.

What is allowed is asked of the checks themselves (:func:`isr_jax.config.validate`
and each algorithm's ``settings``): a setting is handed values no check accepts
and the one-line refusal is read back, so this listing cannot drift from what a
run refuses. Where a default comes from is the comment written beside it: the
citation above each algorithm's ``DEFAULTS``, the note beside each line of
:func:`~isr_jax.config.default_config`.
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, NamedTuple

import ml_collections

from isr_jax.config import default_config, validate
from isr_jax.config_names import has_setting, no_setting_message
from isr_jax.errors import ConfigError
from isr_jax.fl import placement
from isr_jax.fl.channel.spec import SECTIONS as CHANNEL_SECTIONS
from isr_jax.fl.registry import ALGORITHMS

# Values no setting accepts: a word no list holds, a number no interval holds
# (NaN), and a fraction no integer setting holds. Each refusal says what is allowed.
_PROBES = ("?", float("nan"), 2.5)


class Setting(NamedTuple):
  """One row of a section: the dotted ``name``, its ``value`` in the config,
  what is ``allowed`` (the checks' words, or "" where nothing is checked before
  the run) and the ``note`` written beside its default."""

  name: str
  value: Any
  allowed: str
  note: str


def flat_settings(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Dotted name -> value of every setting under ``prefix`` (empty sections as ``{}``)."""
  flat = {}
  for key in sorted(config):
    value = config[key]
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      flat.update(flat_settings(value, f"{name}."))
    else:
      flat[name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return flat


def _with(config: ml_collections.ConfigDict, name: str, value) -> ml_collections.ConfigDict:
  """A copy of ``config`` (any types allowed) with ``name`` set to ``value``, and the
  settings that make the checks read it: its algorithm chosen, hybrid mode for hybrid.*."""
  probe = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  parts = name.split(".")
  if parts[0] == "fl" and len(parts) > 2 and parts[1] in ALGORITHMS:
    probe.fl.algorithm = parts[1]
  if parts[0] == "hybrid":
    probe.mode = "hybrid"
  node = probe
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value
  return probe


def rejection(config: ml_collections.ConfigDict, name: str, value) -> str | None:
  """The checks' one line refusing ``name=value`` in ``config``; None if they accept it.

  A refusal that names another setting (``config`` invalid elsewhere, or a check
  that fails on the value before reaching its own) counts as none.
  """
  try:
    validate(_with(config, name, value))
  except ConfigError as e:
    message = str(e)
    return message if message.startswith(f"{name}=") else None
  except Exception:  # a check that does not expect this type at all: nothing to say
    return None
  return None


def allowed(config: ml_collections.ConfigDict, name: str) -> str:
  """What the checks allow for ``name`` ("" where nothing is checked before the run)."""
  found = []
  for value in _PROBES:
    message = rejection(config, name, value)
    if message is not None:
      found.append(message[len(f"{name}={value!r} "):])
  for word in ("is not one of", "True or False", "integer", "must be in", "must be a number"):
    tail = next((t for t in found if word in t), None)
    if tail is not None:
      return tail.removeprefix("must be ").replace("is not one of", "one of")
  return found[0] if found else ""


def _comment_block(lines: list[str], end: int, module_level: bool = False) -> str:
  """The ``#`` comment lines right above ``lines[end]``.

  ``module_level``: the line is one of a module's ``...DEFAULTS = `` lines, and
  the comment may stand above a sibling of it (``FEDSAM_DEFAULTS`` then
  ``FEDASAM_DEFAULTS``), past that sibling's continuation lines.
  """
  note: list[str] = []
  i = end - 1
  while i >= 0:
    line = lines[i]
    if line.lstrip().startswith("#"):
      note.insert(0, line.strip().lstrip("#").strip())
    elif not (module_level and not note and (re.match(r"\w+DEFAULTS = ", line)
                                             or line.startswith(" "))):
      break
    i -= 1
  return " ".join(note)


def algorithm_citation(name: str) -> str:
  """The comment above the ``DEFAULTS`` of algorithm ``name``: whose values they are."""
  entry = ALGORITHMS[name]
  module = sys.modules[entry.build.__module__]
  variable = next((v for v, obj in vars(module).items()
                   if v.endswith("DEFAULTS") and obj is entry.defaults), None)
  first = (inspect.getdoc(module) or "").split("\n")[0]
  if variable is None:
    return first
  lines = inspect.getsource(module).splitlines()
  end = next(i for i, line in enumerate(lines) if line.startswith(f"{variable} = "))
  return _comment_block(lines, end, module_level=True) or first


def default_notes() -> dict[str, str]:
  """Dotted name -> the comment beside (or above) its line in ``default_config``."""
  lines = inspect.getsource(default_config).splitlines()
  notes, section = {}, None
  for i, line in enumerate(lines):
    assigned = re.match(r"\s*c\.([\w.]+)\s*=\s*(.*)$", line)
    if assigned:
      name = assigned.group(1)
      section = name if "ConfigDict(" in assigned.group(2) else None
      inline = line.split("  # ", 1)[1] if "  # " in line else ""
      note = inline or _comment_block(lines, i)
      if note:
        notes[name] = note
    elif section and (item := re.match(r"\s*(\w+)=[^#]*#\s*(.*)$", line)):
      notes[f"{section}.{item.group(1)}"] = item.group(2)
  return notes


def channel_notes() -> dict[str, str]:
  """Dotted name -> the comment beside its line in a channel part's or
  ``fl.population``'s ``DEFAULTS``."""
  notes = {}
  for section, module in {**CHANNEL_SECTIONS, "population": placement}.items():
    for line in inspect.getsource(module).splitlines():
      if item := re.match(r'\s*"(\w+)":[^#]*#\s*(.*)$', line):
        notes[f"fl.{section}.{item.group(1)}"] = item.group(2)
  return notes


def describe(config: ml_collections.ConfigDict, prefix: str = "") -> list[Setting]:
  """One :class:`Setting` per setting of ``config`` under the dotted ``prefix``.

  Raises:
    ConfigError: ``prefix`` is no setting or section of ``config``.
  """
  prefix = prefix.strip(".")
  if prefix and not has_setting(config, prefix):
    raise ConfigError(f"{prefix}: {no_setting_message(config, prefix)}")
  node = config
  for part in prefix.split(".") if prefix else ():
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    rows = {prefix: node}
  else:
    rows = flat_settings(node, f"{prefix}." if prefix else "")
  notes = {**default_notes(), **channel_notes()}
  return [Setting(name, value, allowed(config, name), notes.get(name, ""))
          for name, value in rows.items()]


def section_note(prefix: str) -> str:
  """Where a section's defaults come from: an algorithm's citation, or the note
  beside the section in ``default_config``."""
  parts = prefix.strip(".").split(".")
  if parts[0] == "fl" and len(parts) == 2 and parts[1] in ALGORITHMS:
    return algorithm_citation(parts[1])
  if parts[0] == "fl" and len(parts) == 2 and parts[1] in CHANNEL_SECTIONS:
    return (inspect.getdoc(CHANNEL_SECTIONS[parts[1]]) or "").split("\n")[0]
  if parts == ["fl", "population"]:
    return (inspect.getdoc(placement) or "").split("\n")[0]
  return default_notes().get(prefix.strip("."), "")
