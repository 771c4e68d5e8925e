r"""The PyTorch side of the benchmarks, run in a process of its own.

The loops here are the seed papers' FedAvg (per client ``load_state_dict``,
local SGD, then the average of the clients' state_dicts) and the plain step
loop of ``benchmarks.step_cost``. The benchmarks time them in a child process
that imports PyTorch and NumPy only, as a researcher's own script runs, not
next to JAX. A PyTorch loop in a process where JAX had run a round ran
1.13–1.19× faster than the same loop alone (FedAvg CNN, 10 clients × 10 steps,
2026-12-03), and the loop alone with glibc's malloc thresholds set by
environment (:data:`TUNED_MALLOC`) ran as fast as that: what XLA allocated
and freed had most likely moved glibc's dynamic thresholds, so PyTorch's
per-step activations (6 MB at batch 64) stopped being fresh ``mmap`` pages
faulted in every step. The rows therefore come in two flavours: the process as
a user starts it (the baseline of the ratios), and the same with
:data:`TUNED_MALLOC`, the stronger baseline.

Protocol of ``python -m benchmarks.torch_baseline SPEC.pkl``: the child builds
the loop from the pickled spec, runs it once as a warm-up, prints ``ready``;
then for every ``run`` line on stdin it runs it once more and prints the seconds.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# glibc malloc by environment: blocks up to 32 MiB (the largest threshold glibc
# takes) from the heap, and the heap's free top kept up to 256 MiB, so a step's
# activations reuse memory instead of faulting in fresh pages every step.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def torch_device():
  import torch

  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_description() -> str:
  """PyTorch's version and where it runs (for the tables' headers), or ``absent``."""
  if not torch_available():
    return "absent"
  import torch

  device = torch_device()
  where = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"CPU, {torch.get_num_threads()} threads")
  return f"{torch.__version__} ({where})"


def torch_model(name: str, width: int = 32):
  """``name``'s PyTorch twin, as :mod:`isr_jax.models.cnn` builds it (ConvNets of ``width``)."""
  import torch.nn as nn

  if name == "fedavg_cnn":
    return nn.Sequential(
        nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(7 * 7 * 64, 512), nn.ReLU(), nn.Linear(512, 10))
  if name == "small_cnn":  # the overhead-bound workload: LeNet-5 shaped for 8×8 inputs
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * 2 * 16, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
  if name == "lenet5":
    return torch_lenet5()
  if name in ("convnet3", "convnet4"):
    return torch_convnet(int(name[-1]), width)
  raise ValueError(name)


def torch_lenet5():
  """LeNet-5 as :class:`isr_jax.models.cnn.LeNet5` builds it for 28×28×1 (61,706 params)."""
  import torch.nn as nn

  return nn.Sequential(
      nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def torch_round(name, x, y, lr=0.01, momentum=0.9):
  """A callable running one equal-clients round on ``x [C, S, B, H, W, 1]``, ``y [C, S, B]``.

  The seed papers' loop: per client load_state_dict, one SGD step per batch,
  then the unweighted average.
  """
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  device = torch_device()
  global_model = torch_model(name).to(device)
  local = torch_model(name).to(device)
  # NHWC numpy -> NCHW torch on the device, once, outside the timed loop (as the
  # JAX rows get their data on the device).
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 3))).to(device)
  y = torch.from_numpy(y.astype(np.int64)).to(device)
  clients, steps = y.shape[:2]

  def one_round():
    states = []
    for c in range(clients):
      local.load_state_dict(global_model.state_dict())
      opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum)
      for s in range(steps):
        opt.zero_grad()
        F.cross_entropy(local(x[c, s]), y[c, s]).backward()
        opt.step()
      states.append({k: v.clone() for k, v in local.state_dict().items()})
    global_model.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
    if device.type == "cuda":  # CUDA runs asynchronously: time the work, not its launch
      torch.cuda.synchronize()

  return one_round


def torch_fedavg_runner(x, y, clients, round_ids, *, epochs: int, batch_size: int = 64,
                        lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-5,
                        seed: int = 0, log: list | None = None):
  """A callable that runs the next round of FedAvg as the seed papers' loop does.

  Round ``r`` (the ``r``-th call) trains the clients ``round_ids[r]`` in that
  order: each loads the global state_dict, runs ``epochs`` epochs over its own
  examples ``x[clients[c]]``, reshuffled every epoch (``torch.randperm`` from a
  seeded generator), in batches of ``batch_size`` with the last partial batch,
  one SGD step per batch (``weight_decay`` adds wd·θ to the gradient before
  momentum, as isr_jax's SGD); the global model becomes the |D_n|-weighted mean
  of the clients' state_dicts. The data becomes tensors once, here. ``log``
  receives ``(client, examples, steps)`` of every client trained.
  """
  import torch
  import torch.nn.functional as F

  torch.manual_seed(seed)
  device = torch_device()
  global_model = torch_lenet5().to(device)
  local = torch_lenet5().to(device)
  nchw = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.asarray(x), -1, 1)))
  labels = torch.from_numpy(np.asarray(y).astype(np.int64))
  own = [(nchw[torch.from_numpy(np.asarray(ix))].to(device),
          labels[torch.from_numpy(np.asarray(ix))].to(device)) for ix in clients]
  generator = torch.Generator().manual_seed(seed)
  rounds = iter(round_ids)

  def one_round():
    states, sizes = [], []
    for c in next(rounds):
      cx, cy = own[int(c)]
      n = len(cy)
      local.load_state_dict(global_model.state_dict())
      opt = torch.optim.SGD(local.parameters(), lr=lr, momentum=momentum,
                            weight_decay=weight_decay)
      steps = 0
      for _ in range(epochs):
        perm = torch.randperm(n, generator=generator).to(device)
        for start in range(0, n, batch_size):
          b = perm[start:start + batch_size]
          opt.zero_grad()
          F.cross_entropy(local(cx[b]), cy[b]).backward()
          opt.step()
          steps += 1
      states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
      sizes.append(n)
      if log is not None:
        log.append((int(c), n, steps))
    w = [n / sum(sizes) for n in sizes]
    global_model.load_state_dict(
        {k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]})
    if device.type == "cuda":  # CUDA runs asynchronously: time the work, not its launch
      torch.cuda.synchronize()

  return one_round


def torch_convnet(depth: int, width: int, shape=(28, 28, 1), num_classes: int = 10):
  """:class:`isr_jax.models.cnn.ConvNet` in PyTorch: conv 3×3 → GroupNorm → ReLU → pool."""
  import torch.nn as nn

  layers, c, h = [], shape[2], shape[0]
  for _ in range(depth):
    layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(math.gcd(width, 32), width),
               nn.ReLU()]
    if h >= 2:
      layers.append(nn.MaxPool2d(2))
      h //= 2
    c = width
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(h * h * width, num_classes))


def torch_steps(name: str, x: np.ndarray, y: np.ndarray, width: int):
  """A callable running one SGD step per batch of ``x [T, B, H, W, C]`` in PyTorch.

  SGD lr 0.01, momentum 0.9, weight decay 1e-5 (``benchmarks.step_cost``).
  """
  import torch
  import torch.nn.functional as F

  torch.manual_seed(0)
  model = torch_model(name, width)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-5)
  tx = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 2)))
  ty = torch.from_numpy(y.astype(np.int64))

  def run():
    for t in range(len(tx)):
      opt.zero_grad()
      F.cross_entropy(model(tx[t]), ty[t]).backward()
      opt.step()

  return run


def torch_conv_loop(op: str, x: np.ndarray, kernel: np.ndarray, dy: np.ndarray, padding: int,
                    iterations: int):
  """A callable running one convolution's ``op`` ``iterations`` times (``benchmarks.conv_cost``).

  ``op``: ``forward`` (``conv2d``), ``input_grad`` or ``kernel_grad``
  (``aten.convolution_backward`` with only that output asked for, as autograd
  calls it); ``x`` NHWC, ``kernel`` HWIO, ``dy`` the output's gradient, NHWC.
  """
  import torch

  tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  tk = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
  tdy = torch.from_numpy(np.ascontiguousarray(dy.transpose(0, 3, 1, 2)))
  mask = [op == "input_grad", op == "kernel_grad", False]

  def once():
    if op == "forward":
      return torch.nn.functional.conv2d(tx, tk, padding=padding)
    grads = torch.ops.aten.convolution_backward(
        tdy, tx, tk, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1, mask)
    return grads[0] if op == "input_grad" else grads[1]

  with torch.no_grad():
    total = torch.zeros_like(once())

  def run():
    # Each result is added into a running total, as isr_jax's timed loop does.
    with torch.no_grad():
      for _ in range(iterations):
        total.add_(once())
    return total

  return run


# What a child process can run: each builds its data and model, and returns the
# callable of one timed unit (a round, a call of steps).
LOOPS = {"round": torch_round, "fedavg": torch_fedavg_runner, "steps": torch_steps,
         "conv": torch_conv_loop}


class TorchProcess:
  """``LOOPS[loop](*args, **kwargs)`` in a child process; calling it runs one round.

  The arguments travel pickled through a temporary file (the data sets are
  hundreds of MB, too much for a pipe's first write to be quick); the child has
  run its warm-up round when the constructor returns. ``tuned_malloc`` starts it
  with :data:`TUNED_MALLOC` in its environment.
  """

  def __init__(self, loop: str, *args, tuned_malloc: bool = False, **kwargs):
    env = dict(os.environ, **(TUNED_MALLOC if tuned_malloc else {}))
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
      spec = f.name
    try:
      with open(spec, "wb") as f:
        pickle.dump((loop, args, kwargs), f, protocol=pickle.HIGHEST_PROTOCOL)
      self._child = subprocess.Popen(
          [sys.executable, "-m", "benchmarks.torch_baseline", spec], env=env, text=True,
          cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
          stdout=subprocess.PIPE)
      self._expect("ready")
    finally:
      os.unlink(spec)

  def _expect(self, what: str) -> str:
    line = self._child.stdout.readline().strip()
    if not line:
      raise RuntimeError(f"the PyTorch child process exited (code {self._child.wait()}) "
                         f"before it printed {what}")
    return line

  def __call__(self) -> float:
    """One round; returns the child's own timing of it (seconds)."""
    self._child.stdin.write("run\n")
    self._child.stdin.flush()
    return float(self._expect("a round's seconds"))

  def close(self) -> int:
    """Ends the child (it exits at the end of its input); returns its exit status."""
    if self._child.poll() is None:
      self._child.stdin.close()
    return self._child.wait()


def torch_rows(loop: str, *args, **kwargs) -> list[tuple[str, TorchProcess]]:
  """A table's PyTorch rows: the loop in its own process as a user starts it, then tuned.

  The first is the baseline the ratios divide by; close the processes after timing.
  """
  label = "PyTorch sequential loop (state_dict load/average), own process"
  return [(label + (", glibc malloc tuned" if tuned else ""),
           TorchProcess(loop, *args, tuned_malloc=tuned, **kwargs)) for tuned in (False, True)]


def _serve(spec_path: str):
  with open(spec_path, "rb") as f:
    loop, args, kwargs = pickle.load(f)
  one_round = LOOPS[loop](*args, **kwargs)
  one_round()  # warm-up
  print("ready", flush=True)
  for line in sys.stdin:
    if line.strip() != "run":
      break
    t0 = time.perf_counter()
    one_round()
    print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
  _serve(sys.argv[1])
