r"""Why ISR does or does not help: its mechanism, measured on finished runs' final models.

  python -m experiments.isr_diagnostics --workdirs=runs/isr_gap/fl-c2-dec0.1-seed0 \
      [--clients=10] [--examples=1000] [--batch=500] [--seed=0]
  python -m experiments.isr_diagnostics --workdirs=runs/isr_gap   # every finished run of a sweep

OmniISR's intermediate supervision (the MI term through an adapter at each
chosen tap, OmniISR paper Eq. 3/5) is meant to shrink the CL–FL gap by
reducing client drift (Lemma 2). For each workdir written by
``isr_jax.train.train_and_evaluate`` (or each finished run listed in a sweep
directory's ``sweep.json``) this rebuilds the experiment from its
``config.json``, restores its latest checkpoint, and measures (see
:mod:`isr_jax.diagnostics`):

* ``adapter_test_accuracy/<tap>`` (ISR on): each adapter's top-1 accuracy at its
  tap on the run's test split;
* ``cos_ce_mi/<tap>`` (ISR on, ``α_m > 0``): ``cos(∇_θ L_CE, ∇_θ α_m L_MI^m)`` at
  the final global model, over a seeded subset of ``--examples`` training
  examples and the backbone parameters the MI term reaches;
* FL runs only: ``--clients`` clients (seeded) each train locally from the final
  global model exactly as the next round would for FedAvg (their own shuffle
  keys, the round's client optimizer and learning rate ``η_T``, ``fl.local_epochs``
  / ``fl.local_steps``, plain ``∇L_T``); ``tap_drift/<tap>`` is the mean over
  them, weighted by their example counts, of the relative feature drift of every
  tap on the client's own training examples, and ``client_cos_ce_mi/<tap>`` (ISR
  on) the plain mean of the cosine above on each client's own data at the
  global model — the two terms as the local updates see them. When the run's
  algorithm is not FedAvg, ``local_update`` says ``fedavg_equivalent``: the
  clients still take plain FedAvg steps, not the algorithm's own.

When the run keeps its adapters on the clients (``isr.aggregate_adapters=False``,
or an algorithm that keeps the whole model), the global adapters never train:
the two global measurements are then left out (``"adapters": "personal"``), and
each client is measured with its own adapters, as a round starts it.

It writes ``<workdir>/isr_diagnostics.json`` (a flat dict; undefined values as
``null``) and prints one line per run. A workdir without ``config.json`` or a
checkpoint, or whose checkpoint, data or config cannot be used, gets one
``error:`` line and is skipped; the others are still measured, and the exit
code is then 1. Runs of a sweep that have not finished are listed and not
measured.
"""

from __future__ import annotations

import functools
import logging as std_logging
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments.common_flags import BATCH, EXAMPLES, REDO, SEED, WORKDIRS
from experiments.finished_runs import (
  FinishedRun,
  load_run,
  measure_each,
  skipping,
  training_examples,
)
from isr_jax import workdir as workdir_files
from isr_jax.data import ClientData
from isr_jax.diagnostics import adapter_accuracy, tap_feature_drift, term_gradient_cosines
from isr_jax.fl.algorithm import Batch, LocalProblem, loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.personal import merge
from isr_jax.fl.selection import round_keys
from isr_jax.fl.spec import FLSpec, RoundFns
from isr_jax.fl.trainer import make_trainer
from isr_jax.optim import learning_rate_at, make_optimizer

ISR_DIAGNOSTICS_FILE = "isr_diagnostics.json"

_CLIENTS = flags.DEFINE_integer("clients", 10, "FL runs: clients that train locally.")


def _flat(a: jax.Array) -> jax.Array:
  """``[S, B, ...]`` -> ``[S·B, ...]``: one client's slots in order."""
  return a.reshape((-1,) + a.shape[2:])


def local_update(problem: LocalProblem, optimizer, start, cdata: ClientData, key: jax.Array,
                 lr: jax.Array, *, epochs: int, steps: int, unroll: int = 1):
  """A FedAvg client's local training from ``start`` on its row ``cdata`` (``[S, B, ...]``).

  The round's own :func:`isr_jax.fl.round.make_trainer` with plain ``∇L_T``
  (FedAvg's client step): its batch schedule from the client's key, a fresh
  optimizer state at learning rate ``lr``, its step masking.

  Returns:
    ``(params, num_steps)``.
  """
  fns = RoundFns(fedavg(), problem, optimizer, lambda _: lr, optimizer)
  spec = FLSpec(clients_per_round=1, local_epochs=epochs, local_steps=steps, unroll=unroll)
  trainer = make_trainer(cdata, key, lr, fns, spec)
  params, _, num_steps = trainer.train(start, lambda p, b, k: loss_grad(p, b, problem))
  return params, num_steps


def _number(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None  # JSON has no NaN


def _global_measurements(run: FinishedRun, examples: int, batch_size: int, seed: int) -> dict:
  """Adapter accuracy on the test split and ``cos(∇CE, ∇αMI)`` at the global model."""
  exp, state = run.experiment, run.state
  spec, ignore_index = exp.isr_spec, exp.info.ignore_index
  record = {}
  test = exp.test_data
  accuracy = jax.jit(functools.partial(adapter_accuracy, exp.apply, spec=spec,
                                       ignore_index=ignore_index, batch_size=test.batch_size))
  for tap, v in accuracy(state.params, x=_flat(test.x[0]), y=_flat(test.y[0]),
                         mask=test.mask[0].reshape(-1)).items():
    record[f"adapter_test_accuracy/{tap}"] = _number(v)
  if spec.adapter_taps:
    x, y, _ = training_examples(run.config, examples, seed)
    cosines = jax.jit(functools.partial(term_gradient_cosines, exp.apply, spec=spec,
                                        ignore_index=ignore_index, batch_size=batch_size))
    batch = Batch(jnp.asarray(x), jnp.asarray(y), jnp.ones(len(y), bool))
    for tap, v in cosines(state.params, batch=batch).items():
      record[f"cos_ce_mi/{tap}"] = _number(v)
    record["examples"] = int(len(y))
  return record


def _client_measurements(run: FinishedRun, clients: int, seed: int) -> dict:
  """Local training of ``clients`` clients from the global model: tap drift and client cosines."""
  config, exp, state = run.config, run.experiment, run.state
  spec, ignore_index, problem = exp.isr_spec, exp.info.ignore_index, exp.problem
  data = exp.round_data[0]
  num_clients = int(config.fl.num_clients)  # rows past it pad the mesh
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.choice(num_clients, size=min(clients, num_clients), replace=False))
  optimizer = make_optimizer(config.client_optimizer, setting="client_optimizer")
  lr = learning_rate_at(config.client_optimizer, state.round)
  _, k_clients, _ = round_keys(state)  # the keys the next round would give them
  personal = state.client_states.get("personal")

  @jax.jit
  def one_client(start, cdata, key):
    end, num_steps = local_update(problem, optimizer, start, cdata, key, lr,
                                  epochs=config.fl.local_epochs, steps=config.fl.local_steps,
                                  unroll=config.fl.unroll)
    x, mask = _flat(cdata.x), cdata.mask.reshape(-1)
    drift = tap_feature_drift(exp.apply, start["model"], end["model"], x, mask,
                              batch_size=cdata.mask.shape[-1])
    cosines = {}
    if spec is not None and spec.adapter_taps:
      cosines = term_gradient_cosines(exp.apply, start, Batch(x, _flat(cdata.y), mask), spec,
                                      ignore_index=ignore_index, batch_size=cdata.mask.shape[-1])
    return drift, cosines, num_steps

  drifts, cosines, sizes, steps = [], [], [], []
  for i in ids:
    row = lambda tree, i=int(i): jax.tree.map(lambda a: a[i], tree)
    start = state.params if personal is None else merge(state.params, row(personal))
    cdata = row(data)
    drift, cos, num_steps = jax.device_get(
        one_client(start, cdata, jax.random.fold_in(k_clients, int(i))))
    drifts.append(drift)
    cosines.append(cos)
    sizes.append(float(cdata.num_examples))
    steps.append(int(num_steps))
  weights = np.asarray(sizes) / sum(sizes)
  record = {"clients": len(ids), "client_local_steps": float(np.mean(steps)),
            "client_learning_rate": float(lr),
            "local_update": "fedavg" if config.fl.algorithm == "fedavg" else "fedavg_equivalent"}
  for tap in exp.tap_names:
    record[f"tap_drift/{tap}"] = _number(np.sum(weights * [d[tap] for d in drifts]))
  for tap in cosines[0]:
    record[f"client_cos_ce_mi/{tap}"] = _number(np.mean([c[tap] for c in cosines]))
  return record


def measure(workdir: str, *, clients: int, examples: int, batch_size: int, seed: int = 0) -> dict:
  """Measures one finished run and writes ``<workdir>/isr_diagnostics.json``.

  Returns:
    What was written: ``round``, ``mode``, ``isr``, and the measurements of the
    module docstring that apply to the run.

  Raises:
    Skipped: no config.json, no checkpoint, or one of the library's errors
      (one line each).
  """
  run = load_run(workdir)
  config, exp, state = run.config, run.experiment, run.state
  with skipping(workdir):
    record = {"round": int(state.round), "mode": str(config.mode),
              "isr": exp.isr_spec is not None}
    if exp.isr_spec is not None:
      if "adapters" in state.client_states.get("personal", {}):
        record["adapters"] = "personal"
      else:
        record.update(_global_measurements(run, examples, batch_size, seed))
    if config.mode == "fl":
      record.update(_client_measurements(run, clients, seed))
    workdir_files.write_json(os.path.join(workdir, ISR_DIAGNOSTICS_FILE), record)
  return record


def _line(workdir: str, r: dict) -> str:
  def values(prefix):
    shown = [f"{k.removeprefix(prefix)}={'n/a' if v is None else f'{v:.3g}'}"
             for k, v in r.items() if k.startswith(prefix)]
    return " ".join(shown)

  parts = [f"{workdir}: round {r['round']} ({r['mode']}, ISR {'on' if r['isr'] else 'off'})"]
  for label, prefix in (("adapter test accuracy", "adapter_test_accuracy/"),
                        ("cos(CE, aMI)", "cos_ce_mi/"),
                        ("client cos(CE, aMI)", "client_cos_ce_mi/"),
                        ("tap drift", "tap_drift/")):
    if any(k.startswith(prefix) for k in r):
      parts.append(f"{label} {values(prefix)}")
  if r.get("adapters") == "personal":
    parts.append("adapters personal: no global adapter measurements")
  if r.get("local_update") == "fedavg_equivalent":
    parts.append("local update: FedAvg steps, not the run's algorithm")
  return "; ".join(parts) + f" -> {os.path.join(workdir, ISR_DIAGNOSTICS_FILE)}"


def main(argv):
  paths = WORKDIRS.value + argv[1:]
  if not paths:
    raise app.UsageError("give the workdirs: --workdirs=a,b or as arguments")
  if EXAMPLES.value < 1 or BATCH.value < 1 or _CLIENTS.value < 1:
    sys.exit("error: --examples, --batch and --clients must be at least 1")
  logging.set_verbosity(logging.WARNING)  # absl and Orbax, which logs through it
  std_logging.getLogger("isr_jax").setLevel(std_logging.WARNING)
  measure_one = functools.partial(measure, clients=_CLIENTS.value, examples=EXAMPLES.value,
                                  batch_size=BATCH.value, seed=SEED.value)
  if measure_each(paths, measure_one, _line, ISR_DIAGNOSTICS_FILE, redo=REDO.value):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
