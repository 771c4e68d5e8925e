r"""The channel's studies: robust rules under attack, DP's accuracy against ε, compression's
bytes against accuracy, and stragglers under FedAvg and FedNova.

  python -m experiments.sweep --sweep=experiments/sweeps/channel.py --workdir=runs/channel
  python -m experiments.sweep --sweep=experiments/sweeps/channel.py:local --workdir=/tmp/ch

experiments/configs/channel.py (FedAvg, LeNet-5, real Fashion-MNIST), seeds 0, 1:
* ``robust``: Dirichlet(0.5), 100 clients, 10 per round; the plain mean and the
  four robust rules, each without attackers and with 10 % / 20 % of the sampled
  clients attacking (sign flip at scale 4, and "a little is enough"). Krum
  assumes f = 2 attackers, the trimmed mean trims β = 0.2 from each end.
* ``dp``: 1,000 clients, 100 per round; no DP, and DP at noise multipliers
  0.3, 1 and 3 (C = 0.5); ε is what the RDP accountant says the 100 rounds cost
  at δ = 1e-5 under fixed-size sampling.
* ``compression``: uncompressed; QSGD at 2 and 4 bits (buckets of 512), and at
  2 bits with error feedback; top-k at 1 % and 10 % with error feedback, and at
  1 % without.
* ``stragglers``: FedAvg and FedNova with every client doing all its work, and
  with half the clients stragglers (U[0.1, 1) of their steps) and 10 % dropouts.

``local`` is the smoke test (digits, 3 rounds, one seed, a few cells).
"""

from experiments.sweeps import Grid, Sweep, axis

RULES = axis("rule", {
    "mean": {"fl.robust.rule": "mean"},
    "median": {"fl.robust.rule": "median"},
    "trimmed_mean": {"fl.robust.rule": "trimmed_mean", "fl.robust.trim_fraction": 0.2},
    "krum": {"fl.robust.rule": "krum", "fl.robust.byzantine": 2},
    "geometric_median": {"fl.robust.rule": "geometric_median"},
})
ATTACKS = axis("attack", {
    "none": {"fl.robust.attack": "none", "fl.robust.attacker_fraction": 0.0},
    **{f"{kind}{pct}": {"fl.robust.attack": kind, "fl.robust.attacker_fraction": pct / 100,
                        "fl.robust.attack_scale": 4.0}
       for kind in ("sign_flip", "alie") for pct in (10, 20)},
})
NOISE = axis("noise", {
    "off": {"fl.dp.enabled": False},
    **{f"z{z}": {"fl.dp.enabled": True, "fl.dp.noise_multiplier": z} for z in (0.3, 1.0, 3.0)},
})
COMPRESSORS = axis("compressor", {
    "none": {"fl.compression.method": "none"},
    # QSGD is unbiased: sent as it is. Error feedback assumes a compressor that
    # shrinks what it is given, which 2-bit QSGD's variance does not (qsgd2_ef).
    "qsgd2": {"fl.compression.method": "qsgd", "fl.compression.bits": 2,
              "fl.compression.error_feedback": False},
    "qsgd4": {"fl.compression.method": "qsgd", "fl.compression.bits": 4,
              "fl.compression.error_feedback": False},
    "qsgd2_ef": {"fl.compression.method": "qsgd", "fl.compression.bits": 2},
    "topk10": {"fl.compression.method": "top_k", "fl.compression.fraction": 0.1},
    "topk1": {"fl.compression.method": "top_k", "fl.compression.fraction": 0.01},
    "topk1_noef": {"fl.compression.method": "top_k", "fl.compression.fraction": 0.01,
                   "fl.compression.error_feedback": False},
})
WORK = axis("work", {
    "all": {"fl.stragglers.dropout": 0.0, "fl.stragglers.straggler_fraction": 0.0},
    "stragglers": {"fl.stragglers.dropout": 0.1, "fl.stragglers.straggler_fraction": 0.5},
})
ALGORITHMS = axis("algorithm", {a: {"fl.algorithm": a} for a in ("fedavg", "fednova")})


def get_sweep(arg: str = ""):
  words = {w for w in arg.split(",") if w}
  if words - {"local"}:
    raise ValueError(f"sweep argument {arg!r}: optional word 'local'")
  local = ",local" if words else ""
  seeds = (0,) if local else (0, 1)
  config = lambda study: f"experiments/configs/channel.py:{study}{local}"
  return Sweep("channel" + local.replace(",", "_"), [
      Grid("robust", config("robust"), [RULES, ATTACKS], seeds=seeds),
      Grid("dp", config("dp"), [NOISE], seeds=seeds),
      Grid("compression", config("compression"), [COMPRESSORS], seeds=seeds),
      Grid("stragglers", config("stragglers"), [ALGORITHMS, WORK], seeds=seeds),
  ], report="channel")
