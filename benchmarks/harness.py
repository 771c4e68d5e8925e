"""What every benchmark shares: timing rows side by side, the machine line, table printing.

The benchmarks (``fl_round``, ``real_workload``, ``step_cost``, ``conv_cost``,
``memory``) each measure one thing; this module holds only how they measure
and print it:

* :func:`interleaved_times` / :func:`interleaved_medians` time several
  callables round-robin, so that the machine's drift hits every row alike and
  a table reads as ratios; :func:`jax_round_runner` compiles a jitted FL round
  and wraps it as such a callable; :func:`strategy_label` names the client
  strategy a row asked for and what ``auto`` ran.
* :func:`machine_description` is the line every table's numbers go with.
* :func:`table_header` / :func:`table_row` print Markdown tables.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np


# --------------------------------------------------------------------------- timing
def interleaved_times(runners, repeats) -> np.ndarray:
  """Seconds ``[callable, repeat]``, timed round-robin so drift hits every row alike.

  A 2-core CPU's speed drifts by ±15 % over minutes; rows timed one after
  another would carry that drift into their ratios. A short pause after each
  call lets PyTorch's spinning worker threads go idle before the next row starts.
  """
  times = np.zeros((len(runners), repeats))
  for r in range(repeats):
    for i, run in enumerate(runners):
      t0 = time.perf_counter()
      run()
      times[i, r] = time.perf_counter() - t0
      time.sleep(0.2)
  return times


def interleaved_medians(runners, repeats) -> list[float]:
  """Median seconds per callable of :func:`interleaved_times`."""
  return [float(np.median(t)) for t in interleaved_times(runners, repeats)]


def jax_round_runner(step, state, data):
  """``(compile seconds, a warmed-up callable that runs one round to completion)``.

  ``step`` is a jitted round ``(state, data) -> (state, metrics)``
  (:meth:`isr_jax.fl.round.FederatedRound.jit`); each call advances the state.
  """
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  box = [state]

  def one_round():
    box[0], metrics = compiled(box[0], data)
    jax.block_until_ready(metrics)

  one_round()
  return compile_s, one_round


def time_jax_round(step, state, data, repeats):
  """``(compile seconds, median round seconds)`` of one round timed alone."""
  compile_s, one_round = jax_round_runner(step, state, data)
  return compile_s, interleaved_medians([one_round], repeats)[0]


def strategy_label(asked: str, ran: str, chunk: int) -> str:
  """``asked`` as a table row names it, with what ``auto`` ran and the chunk size."""
  ran_text = ran + (f", chunks of {chunk}" if ran == "chunked" else "")
  if asked == "auto":
    return f"auto (= {ran_text})"
  return f"{ran} (chunks of {chunk})" if ran == "chunked" else ran


# --------------------------------------------------------------------------- machine
def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_description(torch: str | None = None) -> str:
  """``machine: <CPU>, <cores>; backend …; jax …[; torch …]; <date>``.

  ``cores`` counts those this process may run on (``taskset`` narrows them).
  """
  total = os.cpu_count()
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
  cores = f"{usable} cores" if usable == total else f"{usable} of {total} cores"
  torch_text = f"; torch {torch}" if torch is not None else ""
  return (f"machine: {_cpu_name()} ({platform.machine()}), {cores}; backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}); jax {jax.__version__}"
          f"{torch_text}; {time.strftime('%Y-%m-%d')}")


# --------------------------------------------------------------------------- tables
def table_header(*columns: str) -> str:
  """A Markdown table's header line and its rule."""
  return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def table_row(*cells) -> str:
  """One Markdown table row (cells already formatted)."""
  return "| " + " | ".join(str(c) for c in cells) + " |"
