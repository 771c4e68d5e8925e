"""Where a run keeps its client population: the ``fl.population`` settings and their choice.

``device`` is the dense layout: every client's data packed to the largest
client and every client's state stacked, on the devices, sampled and gathered
inside the round's jit. ``host`` and ``file`` keep the population on the host
(:mod:`isr_jax.fl.population`): the examples once in a ragged store and the
per-client state in versioned row files under ``<workdir>/client_states``
(:class:`~isr_jax.fl.file_store.FileStateStore`), which a checkpoint's resume
restores exactly; ``host`` keeps every row in RAM as well, ``file`` only
``cache_mib`` of them. The rounds compute the same numbers in every placement.

``auto`` keeps the dense layout while it fits ``dense_limit_gib`` and moves the
population to the host above it, to ``file`` once the state would take more
than half the RAM available. A resumed run keeps the placement its
checkpoints were written in.
"""

from __future__ import annotations

from typing import NamedTuple

from isr_jax.config_checks import check_integer, check_number, check_one_of
from isr_jax.errors import ConfigError
from isr_jax.fl.state_store import choose_store, host_memory_budget

PLACEMENTS = ("auto", "device", "host", "file")
STATE_DIR = "client_states"  # under the workdir
METADATA_KEY = "placement"  # the resolved placement, kept with each checkpoint

DEFAULTS = {
    "placement": "auto",  # device, host (rows in RAM), file (rows cached); auto: by size
    "dense_limit_gib": 4.0,  # auto: the most the dense data + stacked state may take
    "eval_chunk": 256,  # host / file: clients per piece of the personalized evaluation
    "cache_mib": 256,  # file: decoded client-state rows kept in RAM
}


class PopulationSettings(NamedTuple):
  """``config.fl.population`` checked; sizes in bytes."""

  placement: str
  dense_limit_bytes: int
  eval_chunk: int
  cache_bytes: int


def settings(config) -> PopulationSettings:
  """``config.fl.population`` checked (one ConfigError line naming the setting)."""
  p = config.fl.population
  placement = check_one_of(p.placement, PLACEMENTS, "fl.population.placement")
  limit = check_number(p.dense_limit_gib, "fl.population.dense_limit_gib", low=0, low_open=True)
  chunk = check_integer(p.eval_chunk, "fl.population.eval_chunk", low=1)
  cache = check_integer(p.cache_mib, "fl.population.cache_mib", low=0)
  return PopulationSettings(placement, int(limit * 2**30), chunk, cache << 20)


def resolve(asked: str, *, dense_bytes: int, state_bytes: int, limit_bytes: int,
            host_bytes: int | None = None) -> str:
  """``device``, ``host`` or ``file``: what ``fl.population.placement = asked`` means here.

  Args:
    asked: the setting.
    dense_bytes: the dense layout's bytes (data packed to the largest client,
      the state stacked).
    state_bytes: the stacked client state's bytes.
    limit_bytes: ``dense_limit_gib`` in bytes.
    host_bytes: RAM the state may take in ``host`` (default half of what is free).
  """
  if asked != "auto":
    return asked
  if dense_bytes <= limit_bytes:
    return "device"
  budget = host_memory_budget() if host_bytes is None else host_bytes
  return choose_store("auto", state_bytes, budget)


def placement_for_resume(asked: str, saved: str | None, workdir: str) -> str:
  """The placement a resumed run uses: the checkpoints' (``device`` before it was kept).

  ``auto`` follows the checkpoints; another explicit placement than theirs is
  refused (the checkpoints hold the client state where they were written).
  """
  saved = saved or "device"
  if asked in ("auto", saved):
    return saved
  if {asked, saved} == {"host", "file"}:  # the same row files, another cache
    return asked
  raise ConfigError(
      f"fl.population.placement={asked!r}: the checkpoints in {workdir} keep the client state "
      f"{'on the device' if saved == 'device' else 'in ' + STATE_DIR + '/'} "
      f"(placement {saved!r}): resume with fl.population.placement='auto' or {saved!r}, or "
      "train this placement in another workdir")
