r"""FedSoL's claim: it beats FedAvg, FedProx, FedSAM, FedASAM and FedNTD under strong label skew.

  python -m experiments.sweep --sweep=experiments/sweeps/fedsol.py --workdir=runs/fedsol
  python -m experiments.flatness --workdirs=$(ls -d runs/fedsol/*/ | paste -sd,)
  python -m experiments.sweep --sweep=experiments/sweeps/fedsol.py:local --workdir=/tmp/fs
  launch/paper_schedules.sh runs/paper          # ``paper``: the full schedule, on a GPU

experiments/configs/fedsol.py (the paper's learning setup on Fashion-MNIST with
LeNet-5, 50 rounds of 5 local epochs) on both label skews, 2 seeds; FedSoL at
the paper's ρ = 2.0 and at ρ = 0.5 and 0.1 from its search grid. The top
Hessian eigenvalue of each final global model (``experiments.flatness``,
FedSoL's flatness argument) joins each run's record when measured.

``paper``: the paper's own schedule and network for a GPU — McMahan's 2-conv
CNN (``fedavg_cnn``), 200 rounds (its MNIST schedule), seed 0
(``launch/paper_schedules.sh``); ``paper,local`` is its smoke test.
"""

from experiments.sweeps import Grid, Sweep, axis

METHODS = axis("method", {
    "fedavg": {"fl.algorithm": "fedavg"},
    "fedprox": {"fl.algorithm": "fedprox"},
    "fedsam": {"fl.algorithm": "fedsam"},
    "fedasam": {"fl.algorithm": "fedasam"},
    "fedntd": {"fl.algorithm": "fedntd"},
    "fedsol": {"fl.algorithm": "fedsol", "fl.fedsol.rho": 2.0},
    "fedsol_rho0.5": {"fl.algorithm": "fedsol", "fl.fedsol.rho": 0.5},
    "fedsol_rho0.1": {"fl.algorithm": "fedsol", "fl.fedsol.rho": 0.1},
})


PAPER = {"model.name": "fedavg_cnn", "num_rounds": 200, "eval_every": 10,
         "checkpoint_every": 50}


def get_sweep(arg: str = ""):
  words = {w for w in arg.split(",") if w}
  if words - {"local", "paper"}:
    raise ValueError(f"sweep argument {arg!r}: optional words 'paper', 'local'")
  local = ",local" if "local" in words else ""
  paper = "paper" in words
  seeds = (0,) if local or paper else (0, 1)
  settings = PAPER if paper and not local else {"model.name": "fedavg_cnn"} if paper else {}
  name = ("fedsol_paper" if paper else "fedsol") + ("_local" if local else "")
  return Sweep(name, [
      Grid(skew, f"experiments/configs/fedsol.py:{skew}{local}", [METHODS], seeds=seeds,
           settings=settings) for skew in ("dir01", "s2")], report="fedsol")
