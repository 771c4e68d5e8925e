"""Trains test_train's tiny config through the Python API (a test worker).

  python tests/workers/train_tiny.py WORKDIR MODE NUM_ROUNDS CHECKPOINT_EVERY [SETTING=VALUE ...]

Started by tests/test_preemption.py, which signals or kills it mid-run. Like a
user's script it calls train_and_evaluate directly and turns ``Preempted``
into its message and the exit code 128 + signal number.
"""

import logging
import os
import sys

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]

from test_train import tiny  # noqa: E402

from isr_jax.errors import Preempted  # noqa: E402
from isr_jax.train import train_and_evaluate  # noqa: E402


def main():
  workdir, mode, num_rounds, checkpoint_every, *settings = sys.argv[1:]
  logging.basicConfig(level=logging.WARNING)
  overrides = dict(s.split("=", 1) for s in settings)  # string settings (names, placements)
  config = tiny(mode, num_rounds=int(num_rounds), eval_every=1000,
                checkpoint_every=int(checkpoint_every), **overrides)
  try:
    train_and_evaluate(config, workdir)
  except Preempted as e:
    print(f"stopped: {e}", file=sys.stderr)
    sys.exit(128 + e.signum)
  print("worker done", flush=True)


if __name__ == "__main__":
  main()
