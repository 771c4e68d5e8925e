"""SIGTERM/SIGINT as a request to stop after the round in progress.

A preempted job (SLURM, Kubernetes, a spot VM) gets SIGTERM and some seconds
before SIGKILL; a user presses Ctrl-C. Either way the round that is running is
worth finishing and saving rather than losing up to ``checkpoint_every - 1``
rounds. :func:`stop_requests` installs handlers that only record the signal;
the training loop polls :attr:`StopRequest.signum` between rounds. A second
signal stops at once (``KeyboardInterrupt``), keeping the last saved checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger("isr_jax")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """The first stop signal received while training, or ``None``."""

  def __init__(self):
    self.signum: int | None = None

  def _handle(self, signum, frame):  # noqa: ARG002 (signal handler signature)
    if self.signum is not None:  # asked twice: the user means now
      raise KeyboardInterrupt
    self.signum = signum
    logger.warning("%s received: stopping after the current round is saved (send it again to "
                   "stop at once)", signal.Signals(signum).name)


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequest]:
  """Records SIGTERM/SIGINT in the yielded :class:`StopRequest` for the block's duration.

  Signal handlers can only be set from the main thread; elsewhere (a notebook's
  worker thread, a test runner's thread) the block runs with the process's
  handlers untouched and the request never fires. The previous handlers are
  restored on exit.
  """
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return
  previous = {s: signal.signal(s, request._handle) for s in SIGNALS}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      # None: a handler set outside Python, which cannot be put back; default it.
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
