"""Convolutions: the lowerings, their derivatives, and the layer :class:`Conv` that picks one.

The lowerings take NHWC × HWIO operands and explicit (low, high) padding:
:func:`conv2d_im2col` (patches + one product, groups included),
:func:`conv2d_dense` (one product with the dense doubly block-Toeplitz matrix),
:func:`conv2d_banded` (one product with the band of the Toeplitz matrix along
the width) and :func:`conv2d_canonical` (``lax.conv`` whose backward pass is
canonical convolutions), each with the values and gradients of
``lax.conv_general_dilated`` up to float rounding. :class:`Conv` resolves SAME /
VALID / int padding and picks its lowering at trace time; why each lowering
exists and which runs where: :mod:`isr_jax.nn.lowering`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from isr_jax.nn.dense import matmul
from isr_jax.nn.lowering import (
  _TEXTBOOK_LOWERING,
  _auto_impl,
  _banded_applies,
  _dense_applies,
  _matmul_impl,
  resolve_conv_impl,
)

default_kernel_init = nnx.initializers.lecun_normal()


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


def conv2d_im2col(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int],
    groups: int,
) -> jax.Array:
  """NHWC x HWIO convolution as patches + one ``einsum`` (see :mod:`isr_jax.nn.lowering`)."""
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
  form of the backward convolutions differs (see :mod:`isr_jax.nn.lowering`).
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
    impl: one of :data:`~isr_jax.nn.lowering.CONV_IMPLS` (:mod:`isr_jax.nn.lowering`);
      grouped convolutions asked for ``"xla_cpu"``, ``"banded"`` or ``"dense"`` use ``"im2col"``.
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
