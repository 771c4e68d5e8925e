"""Experiment config files: each defines ``get_config(arg)`` and the ``WORDS`` of its argument.

The argument after the file's path (``digits.py:fl,isr``) is a comma-separated
list of preset words; :func:`preset_words` checks it with one-line errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from isr_jax.errors import ConfigError


def _kind(word: str, allowed: Sequence[str]) -> str | None:
  """The entry of ``allowed`` that ``word`` is; ``patK`` stands for ``pat`` and a count."""
  for entry in allowed:
    if word == entry or (entry.endswith("K") and re.fullmatch(
        re.escape(entry[:-1]) + r"[1-9][0-9]*", word)):
      return entry
  return None


def preset_words(arg: str, allowed: Sequence[str], *, exclusive: Sequence[Sequence[str]] = (),
                 required: Sequence[Sequence[str]] = ()) -> list[str]:
  """The words of ``arg``, each one of ``allowed``; a one-line ConfigError otherwise.

  Args:
    arg: the file's argument, e.g. ``"fl,isr"``.
    allowed: the words the file knows (an entry ``xK`` allows ``x`` and a count).
    exclusive: groups of words of which at most one may be given.
    required: groups of words of which exactly one must be given.
  """
  words = [w.strip() for w in arg.split(",") if w.strip()]
  for word in words:
    if _kind(word, allowed) is None:
      guess = difflib.get_close_matches(word, allowed, n=1)
      hint = f"; did you mean {guess[0]!r}?" if guess else ""
      raise ConfigError(f"preset word {word!r} is not one of {', '.join(allowed)}{hint}")
  for group in (*exclusive, *required):
    chosen = [w for w in words if _kind(w, allowed) in group]
    if len(chosen) > 1:
      raise ConfigError(f"preset words {chosen[0]!r} and {chosen[1]!r} exclude each other: "
                        f"give one of {', '.join(group)}")
  for group in required:
    if not any(_kind(w, allowed) in group for w in words):
      raise ConfigError(f"preset {arg!r} names none of {', '.join(group)}: give one of them")
  return words
