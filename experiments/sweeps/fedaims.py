r"""FedAIMS against its baselines at a schedule where the personal parts converge.

  python -m experiments.sweep --sweep=experiments/sweeps/fedaims.py --workdir=runs/fedaims
  python -m experiments.sweep --sweep=experiments/sweeps/fedaims.py:dir01 --workdir=runs/fedaims01
  python -m experiments.sweep --sweep=experiments/sweeps/fedaims.py:local --workdir=/tmp/fa
  launch/paper_schedules.sh runs/paper          # ``paper``: Table 2 in full, on a GPU

FedAIMS Table 2's setting (experiments/configs/personalized.py: 100 clients, 10
per round, E = 5 local epochs, batch 64, SGD lr 0.1 with momentum 0.9, weight
decay 1e-4, lr × 0.99 per round; each client's own held-out 25 %), on real
Fashion-MNIST with the 3-layer ConvNet at 32 channels, Dirichlet 0.3 (or 0.1
with ``dir01``), **60 rounds** (each client is sampled about 6 times; the paper
runs 300), 3 seeds. Methods: FedAIMS, FedAIMS-Full, FedAIMS with μ = 0 (the
ablation without prototypes: only the per-block classifiers remain), FedAIMS
with absent classes masked out of the prototype regulariser, FedPer, FedRoD,
FedBABU and FedAvg (whose global model is evaluated on each client's data).
Personal epochs (FedRoD, FedRep, FedBABU's fine-tuning) are the paper's 5.

``paper``: FedAIMS Table 2 as the paper runs it — all 13 methods, 300 rounds
of 5 epochs, the 64-channel ConvNet, on Dir(0.3) and Dir(0.1), seed 0 — for a
GPU (``launch/paper_schedules.sh``); ``paper,local`` is its smoke test.
"""

from experiments.personalized_tables import METHODS as TABLE2_METHODS
from experiments.sweeps import Grid, Sweep, axis

METHODS = axis("method", {
    "fedaims": {"fl.algorithm": "fedaims"},
    "fedaims_full": {"fl.algorithm": "fedaims_full"},
    "fedaims_mu0": {"fl.algorithm": "fedaims", "fl.fedaims.mu": 0.0},
    "fedaims_mask": {"fl.algorithm": "fedaims", "fl.fedaims.absent_classes": "mask"},
    "fedper": {"fl.algorithm": "fedper"},
    "fedrod": {"fl.algorithm": "fedrod"},
    "fedbabu": {"fl.algorithm": "fedbabu"},
    "fedavg": {"fl.algorithm": "fedavg"},
})

# "small" is the 32-channel ConvNet; the schedule and the personal epochs are put back.
SCHEDULE = {"num_rounds": 60, "eval_every": 10, "checkpoint_every": 10, "fl.local_epochs": 5,
            "fl.fedrod.personal_epochs": 5, "fl.fedbabu.finetune_epochs": 5}


TABLE2 = axis("method", {m: {"fl.algorithm": m} for m in TABLE2_METHODS})


def get_sweep(arg: str = ""):
  words = {w for w in arg.split(",") if w}
  if words - {"dir01", "local", "paper"} or {"dir01", "paper"} <= words:
    raise ValueError(f"sweep argument {arg!r}: optional words 'dir01' or 'paper', and 'local'")
  if "paper" in words:
    local = ",local" if "local" in words else ""
    return Sweep(f"fedaims_paper{'_local' if local else ''}", [
        Grid(skew, f"experiments/configs/personalized.py:{skew}{local}", [TABLE2], seeds=(0,))
        for skew in ("dir03", "dir01")], report="personalized")
  skew = "dir01" if "dir01" in words else "dir03"
  if "local" in words:
    grid = Grid(skew, f"experiments/configs/personalized.py:{skew},local", [METHODS],
                seeds=(0,))
  else:
    grid = Grid(skew, f"experiments/configs/personalized.py:{skew},small", [METHODS],
                seeds=(0, 1, 2), settings=SCHEDULE)
  return Sweep(f"fedaims_{skew}{'_local' if 'local' in words else ''}", [grid],
               report="personalized")
