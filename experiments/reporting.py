"""Small helpers shared by the experiment drivers: runs that may diverge, a grid's
console lines, a stop in one line, mean ± std, CSV."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence

from isr_jax.errors import (
  CheckpointError,
  ConfigError,
  DataNotFoundError,
  NaNLossError,
  Preempted,
  WorkdirError,
)
from isr_jax.progress import format_duration, headline
from isr_jax.train import train_and_evaluate
from isr_jax.workdir import write_atomic


def train_unless_diverged(config, workdir: str, label: str) -> dict | None:
  """``train_and_evaluate``'s result, or ``None`` (said on stdout) if the run diverged.

  One diverged run must not cost a driver its other runs: the tables report it
  (:func:`divergence_note`) and average over the runs that finished.
  """
  try:
    return train_and_evaluate(config, workdir)
  except NaNLossError as e:
    # A grid's line already names the run (GridProgress): its label is then empty.
    print(f"{label} DIVERGED: {e}".lstrip(), flush=True)
    return None


@contextlib.contextmanager
def one_line_stops(what: str = "the grid") -> Iterator[None]:
  """A driver's stop and its user errors as one line each, as ``experiments.main`` has them.

  SIGTERM/SIGINT during a run (:class:`Preempted`: the run saved its round) ends
  the process with ``stopped: …`` and 128 + the signal's number; a Ctrl-C
  between runs with ``stopped: interrupted`` and 130; a bad setting, missing
  data, a damaged checkpoint or an unusable workdir with ``error: …`` and 1.
  Never a traceback.
  """
  try:
    yield
  except Preempted as e:  # its message already says how to resume
    print(f"stopped: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    print(f"stopped: interrupted; the runs already saved are kept and the same command "
          f"resumes {what}", file=sys.stderr, flush=True)
    sys.exit(130)
  except (ConfigError, DataNotFoundError, CheckpointError, WorkdirError) as e:
    sys.exit(f"error: {e}")


class GridProgress:
  """One console line per run of a grid: ``[k/N] name … <result> (time; grid ETA)``.

  The line is opened when the run starts (so the console says which run is
  training) and closed with its :func:`~isr_jax.progress.headline`, or
  ``finished earlier, reused`` for a run read back from its workdir. The grid's
  ETA is the mean time of the runs trained so far times the runs left.
  """

  def __init__(self, total: int, *, clock: Callable[[], float] = time.perf_counter,
               out=None):
    self.total = total
    self.clock = clock
    self.out = out
    self.done = 0
    self.trained = 0
    self.trained_s = 0.0
    self._started = 0.0

  def _print(self, text: str, end: str = "\n") -> None:
    print(text, end=end, file=self.out or sys.stdout, flush=True)

  def start(self, name: str) -> None:
    self.done += 1
    self._started = self.clock()
    self._print(f"[{self.done}/{self.total}] {name} … ", end="")

  def skip(self, reason: str) -> None:
    """Closes the run's line with why it was not trained."""
    self._print(reason)

  def finish(self, result: dict | None) -> str:
    """Closes the run's line; ``result``: ``train_and_evaluate``'s, ``None`` if it diverged
    (:func:`train_unless_diverged` closed the line with the reason)."""
    seconds = self.clock() - self._started
    if result is None:
      return "diverged"
    if result.get("finished_earlier"):
      line = f"finished earlier, reused: {headline(result['metrics']) or 'no evaluation'}"
    else:
      self.trained += 1
      self.trained_s += seconds
      left = self.total - self.done
      eta = f"; grid ETA {format_duration(self.trained_s / self.trained * left)}" if left else ""
      line = f"{headline(result['metrics']) or 'no evaluation'} ({format_duration(seconds)}{eta})"
    self._print(line)
    return line


def divergence_note(row: dict) -> str:
  """`` (diverged in k of n seeds)`` for a table row with ``diverged`` > 0, else empty."""
  k = row["diverged"]
  return f" (diverged in {k} of {k + row['seeds']} seeds)" if k else ""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value, NaN for none)."""
  values = list(values)
  if not values:
    return math.nan, math.nan
  return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(mean: float, std: float, digits: int = 4) -> str:
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def write_csv(rows: list[dict], path: str) -> None:
  """Rows of equal keys as a CSV file with a header, replaced all at once."""
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=list(rows[0]))
  writer.writeheader()
  writer.writerows(rows)
  write_atomic(path, text.getvalue())
