"""Layers whose lowering is chosen for where they run.

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
convolution falls back to a naive loop nest. So :class:`Conv` offers three
lowerings:

* ``impl="xla"``: ``lax.conv_general_dilated`` with JAX's own derivatives — the
  right choice on GPU/TPU;
* ``impl="xla_cpu"``: the same forward convolution with a hand-written backward
  pass made of *canonical* convolutions and explicit transposes
  (:func:`conv2d_canonical`), which stays on the fast path inside loops (26 ms
  per step in a scan, as fast as jitted alone); grouped convolutions fall back
  to ``im2col``;
* ``impl="im2col"``: shifted slices concatenated into patches and contracted
  with the kernel in one ``einsum`` — a plain batched matrix multiply under
  ``vmap`` and ``scan`` (the fastest form when clients are vmapped on CPU);
* ``impl="banded"``: each output row in blocks of columns, every block one row of
  a product with the band of the kernel's Toeplitz matrix along the width
  (:func:`conv2d_banded`) — for first layers and other narrow inputs (1–6
  input channels), where the library convolution and im2col's short
  contractions leave the machine idle;
* ``impl="dense"``: the convolution as one product with its dense (doubly
  block-Toeplitz) matrix, gathered from the kernel (:func:`conv2d_dense`) — for
  maps no larger than the kernel's window, where that product needs no more
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
benchmarks/RESULTS.md.

Which library runs a canonical convolution matters as much. jax 0.10's XLA:CPU
hands convolutions to YNNPACK by default, which kept about 1.3 of the benchmark
machine's 2 cores busy on the FL models' convolutions; Eigen's kernel, XLA's
other path, keeps both busy (a FedAvg-CNN training step: 49.5 → 36.1 ms).
:func:`xla_compiler_options` therefore compiles rounds on CPU with YNNPACK
limited to dots and reductions (the rest of XLA's default).

Max-pooling is written as elementwise maxima of strided views (or, for a
stored convolution output, ``reshape`` + ``max``), with a hand-written
elementwise backward, because the backward pass of ``reduce_window``
(select-and-scatter) is slow on XLA CPU and that of a ``reshape`` + ``max``
counts ties with a slow reduction. Dense layers and im2col / banded patches
are multiplied by :func:`matmul`, whose kernel gradient on CPU is the
transposed-operand product autodiff writes only for long contractions (a
convolution's patches); shorter ones, slow in that form under ``vmap``, are
plain products of a transposed copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

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

# :func:`matmul`'s kernel gradient contracts the ``M`` rows of its operands. From this
# many rows on (a convolution's patches: LeNet-5's conv1 / conv2 at 28×28, batch 32–64,
# 6,272–12,544 / 960–1,920 rows) it is the plain transposed-operand product, which
# XLA:CPU runs faster than a transpose and a product (the transpose of a 12,544-row
# gradient fused with the max-pool backward took 0.6 ms, as long as the product): a
# 28×28 LeNet-5 training step 1.17–1.19× faster, 1.07× with 4 clients vmapped. Short
# contractions keep the transposed forms: batched small matrices (LeNet-5 on 8×8 digits,
# 20 clients vmapped, ≤ 256 rows) ran 0.90× with the plain product.
PLAIN_KERNEL_GRADIENT_MIN_ROWS = 512

default_kernel_init = nnx.initializers.lecun_normal()

_TEXTBOOK_LOWERING = contextvars.ContextVar("textbook_lowering", default=False)


@contextlib.contextmanager
def textbook_lowering():
  """Within it, every :class:`Conv` traces as ``lax.conv`` (``impl="xla"``), whatever its ``impl``.

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
  """Whether ``auto``/``matmul`` use :func:`conv2d_banded`: stride 1, no dilation, no
  groups, at most :data:`BANDED_MAX_IN_FEATURES` input channels (where it was measured
  to win; the lowering itself takes any stride and dilation)."""
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


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _same_padding(size: int, k: int, stride: int, dilation: int) -> tuple[int, int]:
  """XLA's SAME padding: output size ceil(size / stride)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
  return total // 2, total - total // 2


def conv_padding(
    hw: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    padding: str | int | Sequence[int],
) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit (low, high) padding per spatial dim for SAME / VALID / int."""
  if padding == "SAME":
    return tuple(
        _same_padding(hw[i], kernel_size[i], strides[i], dilation[i]) for i in range(2)
    )  # type: ignore[return-value]
  if padding == "VALID":
    return (0, 0), (0, 0)
  p = _pair(padding)  # type: ignore[arg-type]
  return (p[0], p[0]), (p[1], p[1])


def _output_hw(in_hw, kernel_hw, strides, padding, dilation) -> tuple[int, int]:
  """Output height and width of a convolution with explicit (low, high) padding."""
  return tuple((in_hw[a] + sum(padding[a]) - (kernel_hw[a] - 1) * dilation[a] - 1)
               // strides[a] + 1 for a in range(2))  # type: ignore[return-value]


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x [..., K] @ kernel [K, O]`` (a dense layer, or im2col patches) whose kernel
  gradient is a plain matmul.

  Autodiff writes the kernel gradient as ``xᵀ @ dy``, contracting ``x``'s
  leading axes: a transposed-operand dot that XLA:CPU's YNNPACK does not take.
  Eigen runs it faster than any rewrite when the contraction is long (at least
  :data:`PLAIN_KERNEL_GRADIENT_MIN_ROWS` rows: a convolution's patches), so those
  keep it, but at 7–29 GFLOP/s on the short ones of batched small matrices
  (LeNet-5 on 8×8 digits under ``vmap``). On CPU a short one is an ordinary
  product with one operand transposed first, whichever moves
  less memory: ``(xᵀ) @ dy`` when ``x`` is smaller than ``dy`` and the gradient
  together (a dense layer: transposing the [M, K] activations, not the [K, O]
  gradient, which the optimizer would otherwise read transposed — 1.5 ms of a
  FedAvg-CNN step), else ``((dyᵀ) @ x)ᵀ`` (im2col patches: 1.7× faster at LeNet-5's
  conv2 shapes). Optimization barriers keep XLA's simplifier from folding the
  transposes back into the slow form.
  Same values and gradients as ``x @ kernel``.
  """
  return jnp.einsum("...k,ko->...o", x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum("...o,ko->...k", dy, kernel)
  x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  (m, k), o = x.shape, dy.shape[1]
  if jax.default_backend() != "cpu" or m >= PLAIN_KERNEL_GRADIENT_MIN_ROWS:
    return dx, x.T @ dy
  if m * k <= (m + k) * o:  # transposing x moves no more than dy and the gradient
    return dx, lax.optimization_barrier(x.T) @ dy
  dy_t = lax.optimization_barrier(dy.T)
  return dx, lax.optimization_barrier(dy_t @ x).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
  if plain and precision is None and all(v is None for v in kwargs.values()):
    return matmul(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  """``nnx.Linear`` (same parameters and initialisation) computed with :func:`matmul`."""
  return nnx.Linear(in_features, out_features, dot_general=_dense_dot_general, rngs=rngs,
                    **kwargs)


def conv2d_im2col(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int,
) -> jax.Array:
  """NHWC x HWIO convolution as patches + one ``einsum`` (see module docstring)."""
  kh, kw, cin_g, cout = kernel.shape
  if kh == kw == 1 and strides == (1, 1) and padding == ((0, 0), (0, 0)) and groups == 1:
    return matmul(x, kernel[0, 0])
  oh, ow = _output_hw(x.shape[1:3], (kh, kw), strides, padding, dilation)
  x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  # Patches in two passes, kw shifts along the width then kh along the height,
  # rather than kh·kw shifted windows at once: XLA fuses whatever produced ``x``
  # (LeNet-5's ReLU and max-pool) into every slice that reads it, so kh·kw
  # windows recomputed it kh·kw times (25 slice fusions, 55 % of a 28×28 LeNet-5
  # step); now kw slices recompute it and kh slices copy contiguous runs of
  # kw·cin values: a 28×28 LeNet-5 step 1.24–1.30× faster, a cross-device Fashion-MNIST
  # round 1.18–1.23× (benchmarks/RESULTS.md §7).
  rows = jnp.concatenate(
      [x[:, :, j * dilation[1] : j * dilation[1] + (ow - 1) * strides[1] + 1 : strides[1]]
       for j in range(kw)], axis=-1)  # [B, H, ow, kw*cin]
  patches = jnp.concatenate(
      [rows[:, i * dilation[0] : i * dilation[0] + (oh - 1) * strides[0] + 1 : strides[0]]
       for i in range(kh)], axis=-1)  # [B, oh, ow, kh*kw*cin], ordered (i, j, c)
  if groups == 1:
    return matmul(patches, kernel.reshape(kh * kw * cin_g, cout))
  # Grouped (incl. depthwise): contract each group's patches with its kernels.
  b = x.shape[0]
  patches = patches.reshape(b, oh, ow, kh * kw, groups, cin_g)
  k = kernel.reshape(kh * kw, cin_g, groups, cout // groups)
  y = jnp.einsum("bhwkgc,kcgo->bhwgo", patches, k)
  return y.reshape(b, oh, ow, cout)


@functools.cache
def _toeplitz_taps(
    in_hw: tuple[int, int],
    kernel_hw: tuple[int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
) -> np.ndarray:
  """``[H·W, Ho·Wo]``: the kernel tap ``i·kw + j`` that joins input pixel ``p`` to
  output pixel ``o``, or ``kh·kw`` (out of range: a zero) where none does."""
  (h, w), (kh, kw) = in_hw, kernel_hw
  out_hw = _output_hw(in_hw, kernel_hw, strides, padding, dilation)
  # Input row/column read by output row/column o through kernel row/column i.
  rows = (np.arange(out_hw[0])[:, None] * strides[0] - padding[0][0]
          + np.arange(kh)[None, :] * dilation[0])
  cols = (np.arange(out_hw[1])[:, None] * strides[1] - padding[1][0]
          + np.arange(kw)[None, :] * dilation[1])
  taps = np.full((h * w, out_hw[0] * out_hw[1]), kh * kw, np.int32)
  out_index = np.arange(out_hw[0] * out_hw[1]).reshape(out_hw)
  for i in range(kh):
    for j in range(kw):
      r, c = rows[:, i][:, None], cols[:, j][None, :]
      inside = np.broadcast_to((r >= 0) & (r < h) & (c >= 0) & (c < w), out_index.shape)
      taps[(r * w + c)[inside], out_index[inside]] = i * kw + j
  return taps


def conv2d_dense(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
) -> jax.Array:
  """NHWC x HWIO convolution (no groups) as ONE product with its dense matrix.

  ``y[b, o, d] = Σ_{c, p} x[b, c, p] · T[c, p, o, d]`` with
  ``T[c, p, o, d] = kernel[tap(p, o), c, d]`` (zero where output pixel ``o``'s
  window misses input pixel ``p``): the doubly block-Toeplitz matrix of the
  convolution, gathered from the kernel. Rows are channel-major so that the
  gather writes ``T`` in the order the product reads it; its gradient is the
  matching scatter-add into the kernel. Same values and gradients as
  ``lax.conv_general_dilated`` up to float rounding.
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  taps = _toeplitz_taps((h, w), (kh, kw), strides, padding, dilation)
  out_hw = _output_hw((h, w), (kh, kw), strides, padding, dilation)
  kernel_taps = kernel.reshape(kh * kw, cin, cout).transpose(1, 0, 2)  # [C, kh·kw, D]
  matrix = jnp.take(kernel_taps, taps, axis=1, mode="fill", fill_value=0)  # [C, P, O, D]
  x_cp = x.reshape(b, h * w, cin).transpose(0, 2, 1).reshape(b, cin * h * w)
  y = matmul(x_cp, matrix.reshape(cin * h * w, -1))
  return y.reshape(b, *out_hw, cout)


def conv2d_banded(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    block: int | None = None,
) -> jax.Array:
  """NHWC x HWIO convolution (no groups) as ONE product with a banded kernel matrix.

  Each output row is cut into blocks of ``block`` columns (default ``kw - 1``: a 5×5
  kernel computes 4 columns from 8 input columns, 1.6× im2col's multiplications;
  blocks of 2 and 4 tied in the FedAvg-CNN round, 7 was slower). A block reads a strip of
  ``kh`` input rows by ``U = (block-1)·sw + (kw-1)·dw + 1`` columns, and
  ``y[b, r, n·block + o, d] = Σ_{i, u, c} strip[b, r, n, i, u, c] · B[i, u, c, o, d]``
  with ``B[i, u, c, o, d] = kernel[i, (u - o·sw)/dw, c, d]`` where that is a tap and
  zero elsewhere: the band of the convolution's Toeplitz matrix along the width,
  gathered from the kernel. Against im2col it builds ``kh + ceil(U / (block·sw))``
  slices instead of ``kh·kw`` and a contraction ``kh·U·C`` long instead of ``kh·kw·C``
  with ``block``× more output columns, which is what a matmul kernel needs when ``C``
  is small (a first layer, LeNet-5's 6-channel conv2): the FedAvg CNN's 28×28×1 → 32
  convolution runs ~2× faster than XLA:CPU's library convolution, the LeNet-5 round
  on 8×8 digits ~1.1× faster than with im2col, and LeNet-5's conv2 at 28×28
  1.11–1.16× (benchmarks/RESULTS.md). Same values and gradients as
  ``lax.conv_general_dilated`` up to float rounding.
  """
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (dh, dw) = strides, dilation
  block = max(1, kw - 1) if block is None else block
  b = x.shape[0]
  oh, ow = _output_hw(x.shape[1:3], (kh, kw), strides, padding, dilation)
  n_blocks = -(-ow // block)
  span = (block - 1) * sw + (kw - 1) * dw + 1
  step = block * sw
  # Block n's strip is input columns n·step … n·step + U − 1: the concatenation of
  # G = ceil(U / step) whole runs of ``step`` columns, each run a reshape of a
  # contiguous slice of the row. Built so, the backward pass adds G shifted copies
  # instead of padding and adding U single columns (U + 2 fusions, a fifth of a 28×28
  # LeNet-5 step): that step 1.18–1.20× faster, 1.26× with 4 clients vmapped.
  runs = -(-span // step)
  # Pad the width so that the last block's runs exist (their extra columns are cropped).
  right = max(0, (n_blocks + runs - 1) * step - x.shape[2] - padding[1][0])
  x = jnp.pad(x, ((0, 0), padding[0], (padding[1][0], right), (0, 0)))
  hp = x.shape[1]
  cols = jnp.concatenate(
      [x[:, :, k * step : (k + n_blocks) * step].reshape(b, hp, n_blocks, step, cin)
       for k in range(runs)], axis=3)[:, :, :, :span]  # [B, H, n, U, C]
  strips = [cols[:, i * dh : i * dh + (oh - 1) * sh + 1 : sh] for i in range(kh)]
  strips = jnp.stack(strips, axis=3).reshape(b * oh * n_blocks, kh * span * cin)
  q = np.arange(span)[:, None] - np.arange(block)[None, :] * sw  # [U, block]
  taps = np.where((q >= 0) & (q % dw == 0) & (q // dw < kw), q // dw, kw)
  band = jnp.take(kernel, taps, axis=1, mode="fill", fill_value=0)  # [kh, U, block, C, D]
  band = band.transpose(0, 1, 3, 2, 4).reshape(kh * span * cin, block * cout)
  y = matmul(strips, band).reshape(b, oh, n_blocks * block, cout)
  return y[:, :, :ow]


_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, padding, lhs_dilation, rhs_dilation):
  return lax.conv_general_dilated(x, w, strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_canonical(x, kernel, strides, padding, dilation):
  """``lax.conv`` (NHWC × HWIO, no groups) whose backward pass is canonical convolutions.

  Same values and gradients as :func:`jax.lax.conv_general_dilated`; only the
  form of the backward convolutions differs (see the module docstring).
  """
  return _conv(x, kernel, strides, padding, (1, 1), dilation)


def _canonical_fwd(x, kernel, strides, padding, dilation):
  return conv2d_canonical(x, kernel, strides, padding, dilation), (x, kernel)


def _canonical_bwd(strides, padding, dilation, residuals, dy):
  x, w = residuals
  kh, kw = w.shape[:2]
  in_hw, out_hw = x.shape[1:3], dy.shape[1:3]
  # dx: the transposed convolution — dy dilated by the stride, correlated with the
  # flipped kernel whose in/out channels are swapped.
  pad_dx = []
  for i, k in enumerate((kh, kw)):
    k_eff = (k - 1) * dilation[i] + 1
    lo = k_eff - 1 - padding[i][0]
    hi = in_hw[i] - 1 - (out_hw[i] - 1) * strides[i] + padding[i][0]
    pad_dx.append((lo, hi))
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = _conv(dy, w_t, (1, 1), pad_dx, strides, dilation)
  # dw: channels become the batch and the batch becomes the channels, so that the
  # output window spans the kernel: [Cin, H, W, B] ⋆ [Ho, Wo, B, Cout] -> [Cin, kh, kw, Cout].
  x_t = x.transpose(3, 1, 2, 0)
  dy_t = dy.transpose(1, 2, 0, 3)
  pad_dw = []
  for i, k in enumerate((kh, kw)):
    needed = (k - 1) * dilation[i] + (out_hw[i] - 1) * strides[i] + 1
    pad_dw.append((padding[i][0], needed - in_hw[i] - padding[i][0]))
  if any(hi < 0 for _, hi in pad_dw):  # rows past the last window: crop them
    crop = [in_hw[i] + min(pad_dw[i][1], 0) for i in range(2)]
    x_t = x_t[:, : crop[0], : crop[1], :]
    pad_dw = [(lo, max(hi, 0)) for lo, hi in pad_dw]
  dw = _conv(x_t, dy_t, dilation, pad_dw, (1, 1), strides)
  return dx, dw.transpose(1, 2, 0, 3)


conv2d_canonical.defvjp(_canonical_fwd, _canonical_bwd)


class Conv(nnx.Module):
  """2-D convolution, NHWC, kernel HWIO, with a selectable lowering.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: int or (kh, kw).
    strides: int or pair.
    padding: ``"SAME"``, ``"VALID"`` or a symmetric int / pair (PyTorch style).
    dilation: int or pair (atrous convolution).
    groups: feature groups (``in_features`` for depthwise).
    use_bias: add a bias.
    impl: one of :data:`CONV_IMPLS` (module docstring); grouped convolutions
      asked for ``"xla_cpu"``, ``"banded"`` or ``"dense"`` use ``"im2col"``.
    rngs: ``nnx.Rngs`` for initialisation.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int | Sequence[int] = 3,
      *,
      strides: int | Sequence[int] = 1,
      padding: str | int | Sequence[int] = "SAME",
      dilation: int | Sequence[int] = 1,
      groups: int = 1,
      use_bias: bool = True,
      impl: str = "auto",
      kernel_init=default_kernel_init,
      rngs: nnx.Rngs,
  ):
    if in_features % groups or out_features % groups:
      raise ValueError(
          f"Conv groups={groups} must divide in_features={in_features} and "
          f"out_features={out_features}"
      )
    resolve_conv_impl(impl)  # validate early, resolve at trace time
    self.kernel_size = _pair(kernel_size)
    self.strides = _pair(strides)
    self.dilation = _pair(dilation)
    self.padding = padding
    self.groups = groups
    self.impl = impl
    shape = (*self.kernel_size, in_features // groups, out_features)
    self.kernel = nnx.Param(kernel_init(rngs.params(), shape, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.convolve(x)
    return y + self.bias[...] if self.bias is not None else y

  def convolve(self, x: jax.Array) -> jax.Array:
    """The convolution without the bias."""
    pad = conv_padding(
        (x.shape[1], x.shape[2]), self.kernel_size, self.strides, self.dilation, self.padding
    )
    kernel = self.kernel[...]
    impl = "xla" if _TEXTBOOK_LOWERING.get() else self.impl
    if impl in ("auto", "matmul"):
      out_hw = _output_hw(x.shape[1:3], self.kernel_size, self.strides, pad, self.dilation)
      dense = _dense_applies((x.shape[1], x.shape[2]), kernel.shape, out_hw, self.groups)
      banded = _banded_applies(kernel.shape, self.strides, self.dilation, self.groups)
      if impl == "auto":
        patches = x.shape[0] * out_hw[0] * out_hw[1] * int(np.prod(kernel.shape[:3]))
        impl = _auto_impl(patches, dense, banded)
      else:
        impl = _matmul_impl(dense, banded)
    if impl == "dense" and self.groups == 1:
      y = conv2d_dense(x, kernel, self.strides, tuple(pad), self.dilation)
    elif impl == "banded" and self.groups == 1:
      y = conv2d_banded(x, kernel, self.strides, tuple(pad), self.dilation)
    elif impl == "xla_cpu" and self.groups == 1:
      y = conv2d_canonical(x, kernel, self.strides, tuple(pad), self.dilation)
    elif impl == "xla":
      y = lax.conv_general_dilated(
          x, kernel, self.strides, pad, rhs_dilation=self.dilation,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
      )
    else:
      y = conv2d_im2col(x, kernel, self.strides, pad, self.dilation, self.groups)
    return y


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: int = 0,
             *, stored_input: bool = False):
  """Max-pool over H, W of an NHWC tensor (floor mode, like PyTorch).

  ``window == stride`` without padding uses reshape + max; other shapes take the
  max over shifted strided slices. Neither uses ``reduce_window``.

  ``stored_input`` says that ``x`` is the stored result of a library call (a
  convolution's output, no elementwise op after it), which XLA never recomputes:
  the backward pass of a tiled pool then compares ``x`` with the stored maxima
  instead of recomputing them (:func:`_tiled_max_of_stored`).
  """
  stride = window if stride is None else stride
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
  b, h, w, c = x.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  if oh < 1 or ow < 1:
    raise ValueError(f"max_pool window {window} does not fit a {h}x{w} feature map")
  if window == stride:
    tiled = _tiled_max_of_stored if stored_input and not padding else _tiled_max
    return tiled(x[:, : oh * window, : ow * window, :], window)
  out = None
  for i in range(window):
    for j in range(window):
      s = x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
      out = s if out is None else jnp.maximum(out, s)
  return out


def _window_views(x: jax.Array, window: int) -> tuple[jax.Array, list[jax.Array]]:
  """``x`` as [B, H/k, k, W/k, k, C] and its k² strided [B, H/k, W/k, C] views."""
  b, h, w, c = x.shape
  tiles = x.reshape(b, h // window, window, w // window, window, c)
  return tiles, [tiles[:, :, i, :, j, :] for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping k×k tiles of an NHWC map whose sides k divides.

  Same values and gradients as ``reshape(...).max(axis=(2, 4))`` (ties share the
  gradient equally), but written as elementwise ops only: autodiff of the
  reduction counts ties with a second reduction, which XLA:CPU hands to YNNPACK
  and which took 28 % of a FedAvg-CNN training step (a profile of the round).
  """
  return functools.reduce(jnp.maximum, _window_views(x, window)[1])


def _tiled_max_fwd(x, window):
  y = _tiled_max(x, window)
  return y, (x, y)


def _tiled_max_bwd(window, residuals, dy):
  """``dx``: each window's ``dy`` shared equally among its elements equal to ``y``."""
  x, y = residuals
  tiles, views = _window_views(x, window)
  ties = functools.reduce(jnp.add, [(v == y).astype(dy.dtype) for v in views])
  share = (dy / ties)[:, :, None, :, None, :]
  dx = jnp.where(tiles == y[:, :, None, :, None, :], share, 0)
  return (dx.reshape(x.shape),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_of_stored(x: jax.Array, window: int) -> jax.Array:
  """:func:`_tiled_max` of a map that XLA reads from memory, never recomputes.

  Same values and gradients. The forward pass is the reduction, a library call
  whose result is stored once, and the backward pass compares the map with those
  stored maxima: :func:`_tiled_max`'s elementwise maxima were fused into every
  consumer, which recomputed them in its own order (the FedAvg CNN's conv2
  weight gradient transposes its input: 5.5 ms of a 33 ms step), and its
  backward pass recomputed each maximum at every element of the window. A
  training step 1.12× (LeNet-5) and 1.17× (FedAvg CNN) faster at 28×28, batch 64.
  Only for a stored map: where XLA recomputes the map in the backward pass (a
  normalisation fused into it), the recomputed values can round otherwise than
  those the reduction saw, and a window whose maximum equals none of them would
  divide its gradient by zero ties (ConvNet-3 with GroupNorm did).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // window, window, w // window, window, c).max(axis=(2, 4))


def _tiled_max_of_stored_fwd(x, window):
  y = _tiled_max_of_stored(x, window)
  return y, (x, y)


_tiled_max_of_stored.defvjp(_tiled_max_of_stored_fwd, _tiled_max_bwd)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
  """Average-pool over H, W (floor mode, no padding) via reshape + mean or slices."""
  stride = window if stride is None else stride
  b, h, w, c = x.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  if window == stride:
    x = x[:, : oh * window, : ow * window, :]
    return x.reshape(b, oh, window, ow, window, c).mean(axis=(2, 4))
  acc = 0.0
  for i in range(window):
    for j in range(window):
      acc = acc + x[:, i : i + (oh - 1) * stride + 1 : stride,
                    j : j + (ow - 1) * stride + 1 : stride, :]
  return acc / (window * window)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over every axis between batch and channels: [B, ..., C] -> [B, C]."""
  if x.ndim == 2:
    return x
  return x.mean(axis=tuple(range(1, x.ndim - 1)))


def group_norm(num_features: int, *, rngs: nnx.Rngs, groups: int = 32) -> nnx.GroupNorm:
  """GroupNorm with the largest group count <= ``groups`` dividing ``num_features``.

  GroupNorm keeps a model one parameter tree that averages across clients,
  unlike BatchNorm's running statistics.
  """
  g = math.gcd(num_features, groups)
  return nnx.GroupNorm(num_features, num_groups=g, epsilon=1e-5, rngs=rngs)
