"""Runs a tiny digits config and saves the final parameters (a test worker).

  python tests/workers/run_config.py OUT.npz WORKDIR MODE NUM_DEVICES
      [--process_id=I --num_processes=N --port=P] [--algorithm=A] [--placement=P]

Started by tests/test_multidevice.py in subprocesses, because the number of
(virtual CPU) devices and jax.distributed are fixed when JAX starts.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments.configs.digits import get_config  # noqa: E402
from isr_jax.train import train_and_evaluate  # noqa: E402


def tiny(mode: str, num_devices: int, algorithm: str = "fedavg", placement: str = "auto"):
  c = get_config(f"{mode},isr,local")
  c.model.name = "lenet5"
  c.num_rounds = 2
  c.eval_every = 1
  c.fl.num_clients = 6
  c.fl.clients_per_round = 3
  c.fl.local_steps = 3
  c.fl.num_devices = num_devices
  c.dataset.eval_batch_size = 64
  c.fl.algorithm = algorithm
  c.fl.population.placement = placement
  return c


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("workdir")
  parser.add_argument("mode")
  parser.add_argument("num_devices", type=int)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--port", type=int, default=None)
  parser.add_argument("--algorithm", default="fedavg")
  parser.add_argument("--placement", default="auto")
  args = parser.parse_args()
  if args.num_processes:
    jax.distributed.initialize(coordinator_address=f"localhost:{args.port}",
                               num_processes=args.num_processes, process_id=args.process_id)
  result = train_and_evaluate(tiny(args.mode, args.num_devices, args.algorithm, args.placement),
                              args.workdir)
  state = result["state"]
  leaves = {str(i): np.asarray(jax.device_get(x))
            for i, x in enumerate(jax.tree.leaves(state.params)) if x.is_fully_replicated}
  if jax.process_index() == 0:
    np.savez(args.out, test_accuracy=result["metrics"]["test/accuracy"],
             placement=result["experiment"].placement,
             devices=jax.device_count(), processes=jax.process_count(), **leaves)
  print("worker done", jax.process_index(), jax.device_count(), flush=True)


if __name__ == "__main__":
  main()
