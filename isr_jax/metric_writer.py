"""Per-round metrics as JSON lines in the workdir, mirrored to the console.

Each record is appended with a single ``write`` of the whole line followed by
an fsync, so a killed run leaves whole lines; a torn last line (an older
writer, a full disk) is dropped on reading, with a warning.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Mapping

from isr_jax.errors import WorkdirError
from isr_jax.workdir import io_error, write_atomic

METRICS_FILE = "metrics.jsonl"
logger = logging.getLogger("isr_jax")


def _plain(v):
  v = float(v)
  return v if math.isfinite(v) else str(v)


class JsonlWriter:
  """Appends ``{"round": r, **metrics}`` lines to ``<workdir>/metrics.jsonl``."""

  def __init__(self, workdir: str, *, resume_round: int = 0, echo: bool = True,
               enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.echo = echo
    self.enabled = enabled  # False on every process but the first of a multi-host job
    os.makedirs(workdir, exist_ok=True)
    if not enabled:
      return
    if os.path.lexists(self.path) and not os.path.isfile(self.path):
      raise WorkdirError(f"{self.path} is not a file: move it away or use another --workdir")
    if os.path.exists(self.path):
      self._truncate_after(resume_round)
    elif resume_round:
      logger.warning("%s was missing: it starts at round %d, without the %d rounds of the "
                     "checkpoint resumed from", self.path, resume_round + 1, resume_round)

  def _truncate_after(self, resume_round: int) -> None:
    """Drops lines of rounds after the restored checkpoint: the resumed run
    recomputes them (deterministically), so keeping both would duplicate rounds."""
    records = read_metrics(self.path)
    kept = [rec for rec in records if rec.get("round", 0) <= resume_round]
    last = max((rec.get("round", 0) for rec in kept), default=0)
    if last < resume_round:  # lines lost (edited, an older copy): say so, keep what is there
      logger.warning("%s holds rounds up to %d only: rounds %d-%d of the checkpoint resumed "
                     "from are not in it", self.path, last, last + 1, resume_round)
    if len(kept) < len(records) or is_torn(self.path):  # else leave the file alone
      write_atomic(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))

  def write(self, round_index: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    rec = {"round": int(round_index), **{k: _plain(v) for k, v in sorted(metrics.items())}}
    append_record(self.path, rec)
    if self.echo:
      shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in rec.items() if k != "round")
      logger.info("round %d: %s", round_index, shown)


def append_record(path: str, record: Mapping) -> None:
  """Appends ``record`` as one JSON line, synced: a kill leaves the line whole or torn
  (which :func:`read_metrics` drops), never a later line without an earlier one.

  Raises:
    WorkdirError: the write failed (full disk, read-only), one line naming the file.
  """
  line = (json.dumps(record) + "\n").encode()
  try:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      if os.write(fd, line) != len(line):  # a full disk can cut a write short
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      os.fsync(fd)
    finally:
      os.close(fd)
  except OSError as e:
    raise io_error(path, e) from e


def is_torn(path: str) -> bool:
  """Whether the file's last line lacks its newline: what a write cut short leaves."""
  with open(path, "rb") as f:
    f.seek(0, os.SEEK_END)
    if f.tell() == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b"\n"


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file (or of ``<path>/metrics.jsonl``).

  A torn last line is dropped with a warning: it is a record that was being
  written when the run died, and the resumed run writes that round again.

  Raises:
    WorkdirError: a line other than the last is not JSON.
  """
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
  records = []
  for k, (i, line) in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        logger.warning("%s: dropped its torn last line %d (%s)", path, i, e.msg)
        break
      raise WorkdirError(f"{path} line {i} is damaged ({e.msg}): repair or remove that "
                         "line") from e
  return records
