r"""ISR composed with every global-model FL algorithm (OmniISR Table VII's question).

  python -m experiments.sweep --sweep=experiments/sweeps/zoo.py --workdir=runs/zoo
  python -m experiments.sweep --sweep=experiments/sweeps/zoo.py:local --workdir=/tmp/zoo

experiments/configs/compare.py:digits (LeNet-5 on digits, 20 clients,
Dirichlet 0.3, 10 per round, 25 rounds, each algorithm at its registry
defaults): every algorithm that trains one global model, without and with ISR
(2 input-biased taps, α = 0.1, λ = 0.01, decoupled adapters), seeds 0, 1, 2.
``local`` is the smoke test (2 rounds, one seed, FedAvg and FedProx).
"""

from experiments.configs.compare import get_config
from experiments.sweeps import Grid, Sweep, axis

ISR = axis("isr", {"off": {"isr.enabled": False}, "on": {"isr.enabled": True}})


def get_sweep(arg: str = ""):
  if arg not in ("", "local"):
    raise ValueError(f"sweep argument {arg!r}: optional word 'local'")
  algorithms = ("fedavg", "fedprox") if arg else get_config("digits").compare.algorithms
  methods = axis("algorithm", {a: {"fl.algorithm": a} for a in algorithms})
  config = "experiments/configs/compare.py:digits" + (",local" if arg else "")
  return Sweep("zoo", [Grid("digits", config, [methods, ISR],
                            seeds=(0,) if arg else (0, 1, 2))], report="zoo")
