r"""Does ISR shrink the CL–FL gap on real data? (experiments/RESULTS.md §1)

  python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py --workdir=runs/isr_gap
  python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py:taps --workdir=runs/isr_taps
  python -m experiments.sweep --sweep=experiments/sweeps/isr_gap.py:local --workdir=/tmp/isr

LeNet-5 on Fashion-MNIST (experiments/configs/isr_gap.py): CL (Adam, 10 epochs)
and FL (FedAvg, 100 clients, 10 per round, 1 local epoch, 100 rounds) on three
label skews, each without ISR and with five ISR variants, 3 seeds:

* ``none``: ISR off;
* ``literal``: the library's default before decoupled adapters — α = 0.1,
  λ = 0.01, Eq. 5 differentiated literally (the adapters' SGD step scaled by α);
* ``dec0.03``, ``dec0.1``, ``dec0.3``: decoupled adapters at α = 0.03 / 0.1 / 0.3,
  λ = 0.01;
* ``ne``: negative entropy alone (α = 0, λ = 0.01).

``taps``: where ISR supervises — 1, 2 or 3 taps with 1-base spacing, placed at
the input end, the middle or the output end of LeNet-5's six taps — with
decoupled adapters at α = 0.1 (``taps,a0.3`` for another α) on #C = 2, 2 seeds,
beside ISR off on the same seeds.
``local`` shrinks everything to seconds (digits, 3 rounds, one seed).
"""

from experiments.configs.isr_gap import SKEW_SETTINGS
from experiments.sweeps import Grid, Sweep, axis

CONFIG = "experiments/configs/isr_gap.py"

SKEWS = axis("skew", SKEW_SETTINGS)


def isr_variant(alpha: float, *, decouple: bool = True, lam: float = 0.01) -> dict:
  return {"isr.enabled": True, "isr.decouple_adapters": decouple, "isr.mi_weight": alpha,
          "isr.ne_weight": lam}


VARIANTS = axis("isr", {
    "none": {"isr.enabled": False},
    "literal": isr_variant(0.1, decouple=False),
    "dec0.03": isr_variant(0.03),
    "dec0.1": isr_variant(0.1),
    "dec0.3": isr_variant(0.3),
    "ne": isr_variant(0.0),
})

# ``none`` (ISR off, the same seeds) is the reference each placement is paired with.
TAPS = axis("taps", {
    "none": {"isr.enabled": False},
    **{f"{placement}{count}": {"isr.num_taps": count, "isr.spacing": 1,
                               "isr.placement": placement}
       for count in (1, 2, 3) for placement in ("input", "middle", "output")}})


def get_sweep(arg: str = ""):
  words = {w for w in arg.split(",") if w}
  alphas = {w for w in words if w.startswith("a")}
  if words - {"taps", "local"} - alphas or len(alphas) > 1:
    raise ValueError(f"sweep argument {arg!r}: optional words 'taps', 'a<α>' (with taps), "
                     "'local'")
  try:
    alpha = float(alphas.pop()[1:]) if alphas else 0.1
  except ValueError:
    raise ValueError(f"sweep argument {arg!r}: write the α of 'taps' as a0.3") from None
  local = ",local" if "local" in words else ""
  seeds = (0,) if local else (0, 1, 2)
  suffix = "_local" if local else ""  # smoke runs never share a real sweep's records
  if "taps" in words:
    grid = Grid(f"a{alpha}", f"{CONFIG}:fl,c2{local}", [TAPS], seeds=seeds[:2],
                settings=isr_variant(alpha))
    return Sweep(f"isr_taps_a{alpha}{suffix}", [grid], report="isr_taps")
  return Sweep(f"isr_gap{suffix}", [
      Grid("cl", f"{CONFIG}:cl{local}", [VARIANTS], seeds=seeds),
      Grid("fl", f"{CONFIG}:fl{local}", [SKEWS, VARIANTS], seeds=seeds),
  ], report="isr_gap")
