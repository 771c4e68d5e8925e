"""Errors a user can act on. Each carries one line naming the setting and what is allowed."""


class ConfigError(ValueError):
  """A setting is unknown, out of range, or impossible for the data/model at hand."""


class NaNLossError(FloatingPointError):
  """Training produced a non-finite loss; the last good checkpoint was kept."""


class CheckpointError(RuntimeError):
  """A checkpoint in the workdir cannot be read back into the expected state."""


class DataNotFoundError(FileNotFoundError):
  """A dataset is not where the loader looked; the message says how to get it."""


class WorkdirError(OSError):
  """The workdir cannot be used: a file in its place, not writable, a full disk,
  or a file in it damaged beyond what a resume can repair."""


class WorkdirBusy(WorkdirError):
  """Another process is training in the workdir (it holds the workdir's lock)."""


class Preempted(KeyboardInterrupt):
  """SIGTERM/SIGINT stopped training after the round in progress, whose checkpoint was saved.

  A ``KeyboardInterrupt`` so that drivers' ``except Exception`` clauses do not
  swallow a request to stop; ``signum`` gives the entry point its exit code
  (``128 + signum``, the shell's convention for death by signal).
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
