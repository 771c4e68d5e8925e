"""Which convolution lowering runs where: the policy behind :class:`~isr_jax.nn.conv.Conv`.

XLA's CPU backend leaves its fast convolution path when ``lax.conv`` sits inside
a ``lax.scan``/``lax.map`` body or is vmapped over per-client kernels (measured
here: ~930 ms per conv training step inside a scan against ~28 ms jitted alone,
and vmapping over 10 clients' kernels asked for 29 GB). An FL round is exactly
that program: a scan over local steps inside a map over clients.

The cause is the backward pass. JAX writes the kernel gradient as a
convolution with permuted dimension labels (``f01b_i01o->01bf``); jitted alone,
XLA's layout assignment inserts transposes that turn it into a canonical
NHWC×HWIO convolution, which XLA:CPU hands to its fast library (YNNPACK). Inside
a loop body the layouts are pinned, the transposes are not inserted, and the
convolution falls back to a naive loop nest. So :class:`~isr_jax.nn.conv.Conv`
offers these lowerings (written in :mod:`isr_jax.nn.conv`):

* ``impl="xla"``: ``lax.conv_general_dilated`` with JAX's own derivatives — the
  right choice on GPU/TPU;
* ``impl="xla_cpu"``: the same forward convolution with a hand-written backward
  pass made of *canonical* convolutions and explicit transposes
  (:func:`~isr_jax.nn.conv.conv2d_canonical`), which stays on the fast path inside
  loops (26 ms per step in a scan, as fast as jitted alone); grouped convolutions
  fall back to ``im2col``;
* ``impl="im2col"``: shifted slices concatenated into patches and contracted
  with the kernel in one ``einsum`` — a plain batched matrix multiply under
  ``vmap`` and ``scan`` (the fastest form when clients are vmapped on CPU);
* ``impl="banded"``: each output row in blocks of columns, every block one row of
  a product with the band of the kernel's Toeplitz matrix along the width
  (:func:`~isr_jax.nn.conv.conv2d_banded`) — for first layers and other narrow
  inputs (1–6 input channels), where the library convolution and im2col's short
  contractions leave the machine idle;
* ``impl="dense"``: the convolution as one product with its dense (doubly
  block-Toeplitz) matrix, gathered from the kernel (:func:`~isr_jax.nn.conv.conv2d_dense`)
  — for maps no larger than the kernel's window, where that product needs no more
  multiplications than im2col's and the slicing that builds patches costs more
  than the arithmetic (LeNet-5's second convolution on 8×8 digits: a 4×4 map,
  5×5 kernel; 1.14× faster rounds than im2col, benchmarks/RESULTS.md);
* ``impl="matmul"``: per layer ``dense`` where it applies (:func:`_dense_applies`),
  else ``banded`` where it applies (:func:`_banded_applies`), else ``im2col`` —
  never a library convolution.

``impl="auto"`` picks at trace time: ``xla`` on GPU/TPU; on CPU ``dense`` where
it applies, else ``banded`` where it applies (narrow inputs), else ``im2col`` for
small convolutions (patch matrix up to :data:`IM2COL_MAX_PATCH_ELEMENTS` entries,
e.g. anything on 8×8 inputs, where its single matmul beats the library call) and
``xla_cpu`` for large ones. When clients are vmapped on CPU the training loop asks for
``matmul`` everywhere (see :func:`resolve_conv_impl`), because vmapped kernels
turn the library call into a slow grouped convolution. Measurements:
benchmarks/RESULTS.md. Which library then runs a canonical convolution:
:mod:`isr_jax.nn.compiler`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import jax

CONV_IMPLS = ("auto", "xla", "xla_cpu", "im2col", "banded", "dense", "matmul")
# Above this many patch-matrix entries (B·H_out·W_out·kh·kw·C_in) a CPU "auto"
# convolution uses ``xla_cpu``: building the patches costs more than the library
# call (in a FedAvg-CNN round at batch 64 both conv1 (1.25 M) and conv2 (10 M) do;
# everything of a small CNN on 8×8 digits stays below).
IM2COL_MAX_PATCH_ELEMENTS = 1 << 20
# "dense" is used (by "auto"/"matmul") only on maps of at most kh·kw pixels and when
# the dense matrix has at most this many entries per client (LeNet-5's conv2 on 8×8
# digits: 24,576; a 3×3, 512-channel conv on a 3×3 map would need 21 M).
DENSE_MAX_MATRIX_ELEMENTS = 1 << 20
# "banded" is used (by "auto"/"matmul") for stride-1, undilated convolutions with at
# most this many input channels: first layers on grey or RGB images, where a library
# convolution or im2col's kh·kw-wide patches waste most of the machine, and LeNet-5's
# 6-channel conv2 (a 28×28 training step 1.11–1.16× faster than with im2col, also
# under vmap; benchmarks/RESULTS.md §7).
BANDED_MAX_IN_FEATURES = 6

_TEXTBOOK_LOWERING = contextvars.ContextVar("textbook_lowering", default=False)


@contextlib.contextmanager
def textbook_lowering():
  """Within it, every :class:`~isr_jax.nn.conv.Conv` traces as ``lax.conv`` (``impl="xla"``),
  whatever its ``impl``.

  For counting a model's arithmetic with XLA's cost analysis: ``banded`` and
  ``dense`` also multiply the zeros of their Toeplitz matrices (a 28×28 LeNet-5
  step at batch 16 counts 68 MFLOP banded against the textbook 39), so a count
  of the CPU lowering would depend on which lowering the layer picked.
  """
  token = _TEXTBOOK_LOWERING.set(True)
  try:
    yield
  finally:
    _TEXTBOOK_LOWERING.reset(token)


def resolve_conv_impl(impl: str, client_parallelism: str = "sequential") -> str:
  """The lowering a model should be built with for a given client strategy.

  Returns ``impl`` unchanged except for ``"auto"`` on CPU with vmapped clients
  (``vmap``/``chunked``), which becomes ``matmul`` (``dense`` or ``im2col`` per
  layer): vmapped kernels would turn the library convolution into a slow
  grouped one. Otherwise ``"auto"`` stays and is decided per layer at trace
  time (:func:`_auto_impl`).
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl={impl!r} is not one of {list(CONV_IMPLS)}")
  if impl == "auto" and jax.default_backend() == "cpu" and client_parallelism in (
      "vmap", "chunked"):
    return "matmul"
  return impl


def _dense_applies(in_hw: tuple[int, int], kernel_shape: Sequence[int],
                   out_hw: tuple[int, int], groups: int) -> bool:
  """Whether ``auto``/``matmul`` multiply by the dense matrix (module docstring).

  Only without groups, on maps of at most ``kh·kw`` pixels (then the product
  with the ``C·H·W × Ho·Wo·D`` matrix costs no more multiplications per example
  than im2col's ``Ho·Wo × kh·kw·C`` patches by the kernel), and for matrices of
  at most :data:`DENSE_MAX_MATRIX_ELEMENTS` entries.
  """
  kh, kw, cin, cout = kernel_shape
  matrix = cin * in_hw[0] * in_hw[1] * out_hw[0] * out_hw[1] * cout
  return (groups == 1 and in_hw[0] * in_hw[1] <= kh * kw
          and matrix <= DENSE_MAX_MATRIX_ELEMENTS)


def _banded_applies(kernel_shape: Sequence[int], strides: tuple[int, int],
                    dilation: tuple[int, int], groups: int) -> bool:
  """Whether ``auto``/``matmul`` use :func:`~isr_jax.nn.conv.conv2d_banded`: stride 1, no
  dilation, no groups, at most :data:`BANDED_MAX_IN_FEATURES` input channels (where it was
  measured to win; the lowering itself takes any stride and dilation)."""
  return (groups == 1 and strides == (1, 1) and dilation == (1, 1)
          and kernel_shape[2] <= BANDED_MAX_IN_FEATURES)


def _matmul_impl(dense_applies: bool, banded_applies: bool) -> str:
  """What ``matmul`` means for one layer: ``dense``, else ``banded``, else ``im2col``."""
  return "dense" if dense_applies else "banded" if banded_applies else "im2col"


def _auto_impl(patch_elements: int, dense_applies: bool = False,
               banded_applies: bool = False) -> str:
  if jax.default_backend() != "cpu":
    return "xla"
  impl = _matmul_impl(dense_applies, banded_applies)
  if impl == "im2col" and patch_elements > IM2COL_MAX_PATCH_ELEMENTS:
    return "xla_cpu"
  return impl
