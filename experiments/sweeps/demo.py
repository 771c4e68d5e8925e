r"""The main experiment (``make demo``): digits, CL / FL / hybrid, each without and with ISR.

  python -m experiments.demo --workdir=runs/demo
  python -m experiments.sweep --sweep=experiments/sweeps/demo.py --workdir=runs/demo

experiments/configs/digits.py in each mode (FedAvg CNN; FL: FedAvg over 20
clients, Dirichlet 0.3, 10 per round; hybrid: 10 % of the data in the cloud,
fixed α = 0.5), ISR off and on (2 input-biased taps, α = 0.1, λ = 0.01,
decoupled adapters), seeds 0, 1, 2.
"""

from experiments.sweeps import ISR_OFF_ON, Grid, Sweep

MODES = ("cl", "fl", "hybrid")


def get_sweep(arg: str = ""):
  if arg:
    raise ValueError(f"sweep argument {arg!r}: the demo takes none")
  return Sweep("demo", [Grid(mode, f"experiments/configs/digits.py:{mode}", [ISR_OFF_ON],
                             seeds=(0, 1, 2)) for mode in MODES], report="demo")
