"""Each client's personalized accuracy per evaluated round: ``<workdir>/personal.jsonl``.

``metrics.jsonl`` holds the summary across clients (``personal/accuracy_mean``,
``_std``, ``_weighted``, ``clients``); this file holds what it summarizes, one
line per evaluated round::

  {"round": 10, "accuracy": [0.91, null, 0.78, ...], "examples": [34, 0, 41, ...]}

client ``i`` at index ``i`` (the partition's order), ``accuracy`` null for a
client whose own test split is empty. It is written like ``metrics.jsonl``:
one whole line per write, then an fsync, and the lines of rounds after the
checkpoint a run resumes from are dropped (the resumed run evaluates them again).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

from isr_jax.metric_writer import append_record, is_torn, read_metrics
from isr_jax.workdir import write_atomic

PER_CLIENT_FILE = "personal.jsonl"


def client_record(round_index: int, correct: Sequence[float], examples: Sequence[float],
                  num_clients: int | None = None) -> dict:
  """``{"round", "accuracy", "examples"}`` of one evaluation.

  Args:
    round_index: the evaluated round.
    correct: hits per client row (padding rows of a sharded run included).
    examples: test examples per client row.
    num_clients: the real clients, which come first; ``None``: every row.
  """
  correct = np.asarray(correct, np.float64).reshape(-1)[:num_clients]
  examples = np.asarray(examples, np.float64).reshape(-1)[:num_clients]
  return {"round": int(round_index),
          "accuracy": [float(c / n) if n > 0 else None
                       for c, n in zip(correct, examples, strict=True)],
          "examples": [int(n) for n in examples]}


class PerClientWriter:
  """Appends one :func:`client_record` line per evaluation to ``<workdir>/personal.jsonl``.

  Args:
    workdir: the run's workdir.
    num_clients: the real clients (rows past them are padding and are not kept).
    resume_round: the round the run resumes from; later lines are dropped.
    enabled: False on every process but the first of a multi-host job.
  """

  def __init__(self, workdir: str, num_clients: int, *, resume_round: int = 0,
               enabled: bool = True):
    self.path = os.path.join(workdir, PER_CLIENT_FILE)
    self.num_clients = num_clients
    self.enabled = enabled
    if enabled and os.path.exists(self.path):
      records = read_per_client(self.path)
      kept = [r for r in records if r.get("round", 0) <= resume_round]
      if len(kept) < len(records) or is_torn(self.path):
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, round_index: int, correct, examples) -> dict:
    """Appends the round's line (when enabled); returns the record."""
    record = client_record(round_index, correct, examples, self.num_clients)
    if not self.enabled:
      return record
    append_record(self.path, record)
    return record


def read_per_client(path: str) -> list[dict]:
  """The records of a ``personal.jsonl`` (or of ``<workdir>/personal.jsonl``); ``[]``
  where the run wrote none (no personalized evaluation). A torn last line is dropped."""
  if os.path.isdir(path):
    path = os.path.join(path, PER_CLIENT_FILE)
  if not os.path.exists(path):
    return []
  return read_metrics(path)
