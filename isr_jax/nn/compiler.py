"""XLA compiler options for the programs that train: :func:`xla_compiler_options`.

Which library runs a canonical convolution matters as much as its lowering
(:mod:`isr_jax.nn.lowering`). jax 0.10's XLA:CPU hands convolutions to YNNPACK by
default, which kept about 1.3 of the benchmark machine's 2 cores busy on the FL
models' convolutions; Eigen's kernel, XLA's other path, keeps both busy (a
FedAvg-CNN training step: 49.5 → 36.1 ms). :func:`xla_compiler_options` therefore
compiles rounds on CPU with YNNPACK limited to dots and reductions (the rest of
XLA's default).
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np

# XLA:CPU's default library fusions minus INDIVIDUAL_CONVOLUTION, which leaves
# convolutions to Eigen (see the module docstring).
_CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


@functools.cache
def _cpu_compiler_options() -> dict[str, str] | None:
  # The flag is experimental: a jaxlib that no longer knows it gets XLA's defaults.
  try:
    jax.jit(lambda v: v + 1, compiler_options=_CPU_COMPILER_OPTIONS).lower(
        np.float32(0)).compile()
  except Exception:  # any rejection means "not supported here"
    logging.warning("XLA:CPU rejected %s; compiling with its defaults", _CPU_COMPILER_OPTIONS)
    return None
  return dict(_CPU_COMPILER_OPTIONS)


def xla_compiler_options() -> dict[str, str] | None:
  """``compiler_options`` for ``jax.jit`` of a training round on the default backend.

  On CPU: convolutions on Eigen rather than YNNPACK (module docstring,
  benchmarks/RESULTS.md); ``None`` (XLA's defaults) elsewhere. Same values either
  way up to float rounding.
  """
  return _cpu_compiler_options() if jax.default_backend() == "cpu" else None
