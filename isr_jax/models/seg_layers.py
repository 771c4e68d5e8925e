"""Building blocks shared by the segmentation models (DeepLabv3+, TopFormer, SeaFormer).

* :class:`ConvNorm`: convolution + normalisation (+ activation), the ``Conv2d_BN`` /
  ``ConvModule`` unit of the three papers' code bases, with GroupNorm or a
  per-position LayerNorm in place of BatchNorm.
* :class:`InvertedResidual`: the MobileNetV2 block (Sandler et al., CVPR 2018)
  from which TopFormer's Token Pyramid Module and SeaFormer's stem are built.
* :class:`ConvFFN`: the transformer feed-forward network of TopFormer and
  SeaFormer (1x1 conv, 3x3 depthwise conv, activation, 1x1 conv).
* :func:`multi_head_attention`: softmax attention in plain ``einsum``, so it runs
  on CPU and under ``vmap``/``scan`` (no fused kernels).
* :func:`resize`, :func:`adaptive_avg_pool`: bilinear resizing and PyTorch's
  adaptive average pooling without ``reduce_window``.

Normalisation. BatchNorm statistics do not average across clients, so every
norm here is GroupNorm (:func:`seg_norm`: up to 32 groups of at least 4
channels, so a norm on a 1x1 map never reduces a single value to zero) or, for
the parts that act on tokens (attention, the low-resolution semantics), a
LayerNorm over the channels at each position, which behaves the same at every
map size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.nn.conv import Conv
from isr_jax.nn.norm import group_norm
from isr_jax.nn.pooling import avg_pool

NORMS = ("group", "layer")
ACTIVATIONS = {
    None: lambda x: x,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
}

# He et al. (ICCV 2015) initialisation as the reference code bases use it:
# std sqrt(2 / (k * k * out / groups)), i.e. fan-out for dense kernels and the
# (equal) fan-in for depthwise ones.
he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
he_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")
# mmsegmentation's initialisation of the final classifier conv.
head_init = nnx.initializers.normal(0.01)


def check_variant(variants, variant: str, width_multiplier: float, depth) -> None:
  """One-line ConfigErrors for the shared options of TopFormer and SeaFormer."""
  if variant not in variants:
    raise ConfigError(f"model.variant={variant!r} is not one of {list(variants)}")
  if not width_multiplier > 0:
    raise ConfigError(f"model.width_multiplier={width_multiplier!r} must be > 0")
  if depth is not None and (not isinstance(depth, int) or depth < 1):
    raise ConfigError(f"model.depth={depth!r} must be an integer >= 1")


def make_divisible(value: float, divisor: int = 8) -> int:
  """MobileNet's channel rounding: nearest multiple of ``divisor``, never < 90 %."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:
    new += divisor
  return new


def seg_norm(num_features: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm with at most 32 groups and (where possible) >= 4 channels each."""
  return group_norm(num_features, rngs=rngs, groups=min(32, max(1, num_features // 4)))


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """``relu6(x + 3) / 6``, the ``h_sigmoid`` gate of TopFormer and SeaFormer."""
  return jax.nn.relu6(x + 3.0) / 6.0


def resize(x: jax.Array, hw: Sequence[int]) -> jax.Array:
  """Bilinear resize of an NHWC map to ``hw`` (half-pixel centres, no-op if equal).

  For upsampling this equals PyTorch's ``interpolate(..., "bilinear",
  align_corners=False)``, which all three reference code bases use.
  """
  h, w = int(hw[0]), int(hw[1])
  if x.shape[1:3] == (h, w):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear")


def _adaptive_matrix(size: int, out: int) -> np.ndarray:
  """``[out, size]`` averaging weights of PyTorch's ``adaptive_avg_pool``."""
  m = np.zeros((out, size), np.float32)
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, hw: Sequence[int]) -> jax.Array:
  """PyTorch's ``adaptive_avg_pool2d`` on an NHWC map.

  An equal integer factor on both axes is a plain :func:`avg_pool`; any other
  size contracts each axis with its (constant) bin-averaging matrix.
  """
  h, w = x.shape[1], x.shape[2]
  oh, ow = int(hw[0]), int(hw[1])
  if (h, w) == (oh, ow):
    return x
  if h % oh == 0 and w % ow == 0 and h // oh == w // ow:
    return avg_pool(x, h // oh)
  x = jnp.einsum("oh,bhwc->bowc", _adaptive_matrix(h, oh), x)
  return jnp.einsum("pw,bowc->bopc", _adaptive_matrix(w, ow), x)


def multi_head_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int, scale: float
) -> jax.Array:
  """Softmax attention over tokens: ``[B, N, h*d], [B, M, h*d], [B, M, h*e] -> [B, N, h*e]``.

  Channels are split head-major (channel ``c`` belongs to head ``c // d``), as a
  reshape of PyTorch's ``[B, C, N]`` to ``[B, heads, C / heads, N]`` does.
  """
  b, n, _ = q.shape
  m = k.shape[1]
  q = q.reshape(b, n, num_heads, -1)
  k = k.reshape(b, m, num_heads, -1)
  v = v.reshape(b, m, num_heads, -1)
  weights = jax.nn.softmax(jnp.einsum("bnhd,bmhd->bhnm", q, k) * scale, axis=-1)
  return jnp.einsum("bhnm,bmhe->bnhe", weights, v).reshape(b, n, -1)


class ConvNorm(nnx.Module):
  """Bias-free conv -> norm (-> activation): the papers' ``Conv2d_BN`` / ``ConvModule``.

  Padding is PyTorch's symmetric ``dilation * (k - 1) // 2``, so a stride-2 layer
  maps a size ``s`` to ``ceil(s / 2)``.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: square kernel size.
    stride: convolution stride.
    dilation: atrous rate.
    groups: feature groups (``in_features`` for depthwise).
    norm: ``"group"`` (:func:`seg_norm`) or ``"layer"`` (LayerNorm over channels).
    act: ``None``, ``"relu"`` or ``"relu6"``.
    zero_init: start the norm's scale at zero (the references' ``bn_weight_init=0``
      on attention output projections, so a block starts near its shortcut).
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int = 1,
      *,
      stride: int = 1,
      dilation: int = 1,
      groups: int = 1,
      norm: str = "group",
      act: str | None = None,
      zero_init: bool = False,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    if norm not in NORMS:
      raise ValueError(f"norm={norm!r} is not one of {list(NORMS)}")
    if act not in ACTIVATIONS:
      raise ValueError(f"act={act!r} is not one of {list(ACTIVATIONS)}")
    self.conv = Conv(
        in_features, out_features, kernel_size, strides=stride,
        padding=dilation * (kernel_size - 1) // 2, dilation=dilation, groups=groups,
        use_bias=False, impl=conv_impl, kernel_init=he_fan_in if groups > 1 else he_fan_out,
        rngs=rngs,
    )
    if norm == "group":
      self.norm = seg_norm(out_features, rngs=rngs)
    else:
      self.norm = nnx.LayerNorm(out_features, epsilon=1e-5, rngs=rngs)
    if zero_init:
      self.norm.scale[...] = jnp.zeros_like(self.norm.scale[...])
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return ACTIVATIONS[self.act](self.norm(self.conv(x)))


class InvertedResidual(nnx.Module):
  """MobileNetV2 inverted residual block (Sandler et al., CVPR 2018, Table 1).

  ``1x1 expand (t * C_in) -> ReLU -> kxk depthwise (stride) -> ReLU -> 1x1 linear
  projection``, each conv followed by a norm; the expansion is skipped when
  ``t == 1``, and the input is added when the stride is 1 and the channel count
  is kept. TopFormer and SeaFormer configure it by rows ``(k, t, c, s)``.

  Args:
    in_features: input channels.
    out_features: output channels ``c``.
    kernel_size: depthwise kernel ``k``.
    stride: depthwise stride ``s`` (1 or 2).
    expand_ratio: expansion ``t``.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: int,
      stride: int,
      expand_ratio: float,
      *,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    hidden = int(round(in_features * expand_ratio))
    kw = dict(conv_impl=conv_impl, rngs=rngs)
    self.expand = (ConvNorm(in_features, hidden, 1, act="relu", **kw)
                   if expand_ratio != 1 else None)
    self.depthwise = ConvNorm(hidden, hidden, kernel_size, stride=stride, groups=hidden,
                              act="relu", **kw)
    self.project = ConvNorm(hidden, out_features, 1, **kw)
    self.residual = stride == 1 and in_features == out_features

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x if self.expand is None else self.expand(x)
    y = self.project(self.depthwise(y))
    return x + y if self.residual else y


class ConvFFN(nnx.Module):
  """TopFormer / SeaFormer feed-forward network on a feature map.

  ``1x1 conv + norm -> 3x3 depthwise conv (with bias) -> ReLU6 -> 1x1 conv + norm``
  (TopFormer's "Scale-aware Semantics Extractor": linear layers replaced by
  1x1 convolutions and a depthwise conv inserted in the FFN; SeaFormer reuses it).

  Args:
    dim: input and output channels.
    hidden: hidden channels (``mlp_ratio * dim``).
    norm: ``"group"`` or ``"layer"``, see :class:`ConvNorm`.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, dim: int, hidden: int, *, norm: str = "layer", conv_impl: str = "auto",
               rngs: nnx.Rngs):
    self.fc1 = ConvNorm(dim, hidden, 1, norm=norm, conv_impl=conv_impl, rngs=rngs)
    self.dwconv = Conv(hidden, hidden, 3, padding=1, groups=hidden, impl=conv_impl,
                       kernel_init=he_fan_in, rngs=rngs)
    self.fc2 = ConvNorm(hidden, dim, 1, norm=norm, conv_impl=conv_impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu6(self.dwconv(self.fc1(x))))
