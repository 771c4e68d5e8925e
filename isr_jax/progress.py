"""What a run is doing, on the console: its phases, "round k/N" with rate and ETA, its result.

The console is for following a run; its metrics go to ``metrics.jsonl`` and
TensorBoard (``logging.verbose=True`` also logs every round's metrics). A
round's line ends with the headline of the latest evaluation
(:func:`headline`), and the run ends with one ``result:`` line.

Everything goes through the ``isr_jax`` logger at INFO, the logger the
per-round metrics already use, so the command line (absl's handler) and a
script or notebook show the same lines. The reporter is the idea of clu's
``periodic_actions.ReportProgress`` (rate and ETA at intervals) without clu,
which needs TensorFlow for its writers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger("isr_jax")


def show_progress_by_default() -> None:
  """Makes the ``isr_jax`` logger's INFO lines visible unless someone chose otherwise.

  Called from a script or notebook, the logger has no level of its own, so it
  inherits the root's WARNING and every progress line is dropped: the README's
  example used to print nothing for 18 s. A level set on the logger (the
  command-line drivers set INFO or WARNING) is left alone, and a handler is
  added only where no logger up the chain has one — importing Orbax usually
  gives the root one, through absl's ``basicConfig``.
  """
  if logger.level != logging.NOTSET:
    return
  logger.setLevel(logging.INFO)
  if not logger.hasHandlers():
    handler = logging.StreamHandler()  # stderr, like every other log line
    handler.setFormatter(logging.Formatter("%(asctime)s isr_jax: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)


def format_duration(seconds: float) -> str:
  """``4.2s``, ``3m05s``, ``2h07m``: as precise as a human needs for an ETA."""
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m"


def headline(metrics: Mapping[str, object]) -> str:
  """The one-line result of an evaluation: what the run exists to measure, first.

  Personalized accuracy (each client's own model on its own test split, mean ±
  std across clients) where the run measured it, then the global model's test
  accuracy; ``""`` where nothing was evaluated.
  """
  def number(key):
    value = metrics.get(key)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

  parts = []
  if number("personal/accuracy_mean") is not None:
    spread = number("personal/accuracy_std")
    clients = number("personal/clients")
    parts.append(f"personal accuracy {metrics['personal/accuracy_mean']:.4f}"
                 + (f" ± {spread:.4f}" if spread is not None else "")
                 + (f" over {int(clients)} clients" if clients is not None else ""))
  if number("test/accuracy") is not None:
    global_model = "global model's " if parts else ""
    parts.append(f"{global_model}test accuracy {metrics['test/accuracy']:.4f}")
  return "; ".join(parts)


def format_rate(seconds_per_round: float) -> str:
  """Rounds per second when a round is faster than a second, else seconds per round."""
  if seconds_per_round > 0 and seconds_per_round < 1:
    return f"{1 / seconds_per_round:.1f} rounds/s"
  return f"{seconds_per_round:.2f} s/round"


class Progress:
  """Logs a run's phases and its rounds; silent when ``enabled`` is False.

  A round is reported at the first round of the run, every tenth of the
  rounds, the last round, and whenever ``every_secs`` passed since the last
  line (so a run of slow rounds is never silent for long).
  """

  def __init__(self, num_rounds: int, *, enabled: bool = True, every_secs: float = 60.0,
               clock: Callable[[], float] = time.perf_counter):
    self.num_rounds = num_rounds
    self.enabled = enabled
    self.every_secs = every_secs
    self.clock = clock
    self._phase: tuple[str, float] | None = None
    self._start: tuple[int, float] | None = None
    self._last_line = 0.0
    if enabled:
      show_progress_by_default()

  def begin(self, msg: str, *args) -> None:
    """Logs ``msg …`` now; :meth:`end` logs how long it took."""
    self._phase = (msg % args if args else msg, self.clock())
    self._log("%s …", self._phase[0])

  def end(self, msg: str) -> float:
    """Logs ``msg in <seconds>`` for the phase :meth:`begin` opened; returns the seconds."""
    seconds = self.clock() - self._phase[1] if self._phase else 0.0
    self._phase = None
    self._log("%s in %s", msg, format_duration(seconds))
    return seconds

  def start(self, start_round: int) -> None:
    """Marks the start of the rounds; ``start_round`` rounds were already done (resume)."""
    self._start = (start_round, self.clock())
    self._last_line = self._start[1]
    if start_round >= self.num_rounds:
      self._log("all %d rounds were done before; evaluating the restored model", self.num_rounds)
    elif start_round:
      self._log("training rounds %d–%d of %d", start_round + 1, self.num_rounds, self.num_rounds)
    else:
      self._log("training %d rounds", self.num_rounds)

  def round(self, r: int, note: str = "") -> str | None:
    """Reports round ``r`` (1-based) when it is due; returns the line, or None.

    ``note`` (the latest evaluation's :func:`headline`) ends the line.
    """
    if self._start is None:
      self.start(r - 1)
    first, t0 = self._start
    now = self.clock()
    tenth = max(1, self.num_rounds // 10)
    due = (r == first + 1 or r == self.num_rounds or r % tenth == 0
           or now - self._last_line >= self.every_secs)
    if not due:
      return None
    self._last_line = now
    per_round = (now - t0) / (r - first)
    line = (f"round {r}/{self.num_rounds} ({100 * r // self.num_rounds}%): "
            f"{format_rate(per_round)}, ETA {format_duration(per_round * (self.num_rounds - r))}")
    if note:
      line += f" — {note}"
    self._log("%s", line)
    return line

  def result(self, summary: str) -> None:
    """The run's one-line result (``result: <headline>``), once it ended."""
    if summary:
      self._log("result: %s", summary)

  def _log(self, msg: str, *args) -> None:
    if self.enabled:
      # stacklevel: absl's line prefix names the caller of begin/end/round (train.py).
      logger.info(msg, *args, stacklevel=3)
