r"""ISR composed with every global-model FL algorithm (OmniISR Table VII's question).

  python -m experiments.sweep --sweep=experiments/sweeps/zoo.py --workdir=runs/zoo
  python -m experiments.sweep --sweep=experiments/sweeps/zoo.py:local --workdir=/tmp/zoo

experiments/configs/compare.py:digits (LeNet-5 on digits, 20 clients,
Dirichlet 0.3, 10 per round, 25 rounds, each algorithm at its registry
defaults): every algorithm that trains one global model, without and with ISR
(2 input-biased taps, α = 0.1, λ = 0.01, decoupled adapters), seeds 0, 1, 2.
``fashion_mnist``: the same on Fashion-MNIST with the FedAvg CNN, 100 clients,
100 rounds (``compare.py:fashion_mnist``). ``local`` is the smoke test (2
rounds, one seed, FedAvg and FedProx).
"""

from experiments.configs.compare import get_config
from experiments.sweeps import ISR_OFF_ON, Grid, Sweep, axis


def get_sweep(arg: str = ""):
  words = {w for w in arg.split(",") if w}
  data = words & {"digits", "fashion_mnist"}
  if words - {"digits", "fashion_mnist", "local"} or len(data) > 1:
    raise ValueError(f"sweep argument {arg!r}: optional words 'digits' (default) or "
                     "'fashion_mnist', and 'local'")
  data = next(iter(data), "digits")
  local = "local" in words
  base = get_config(data + (",local" if local else ""))
  algorithms = ("fedavg", "fedprox") if local else base.compare.algorithms
  methods = axis("algorithm", {a: {"fl.algorithm": a} for a in algorithms})
  config = f"experiments/configs/compare.py:{data}" + (",local" if local else "")
  name = "zoo" + ("" if data == "digits" else f"_{data}") + ("_local" if local else "")
  return Sweep(name, [Grid(data, config, [methods, ISR_OFF_ON],
                           seeds=tuple(base.compare.seeds))], report="zoo")
