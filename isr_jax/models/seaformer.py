"""SeaFormer (Wan, Huang, Lu, Yu, Zhang, ICLR 2023), with taps.

"SeaFormer: Squeeze-enhanced Axial Transformer for Mobile Semantic
Segmentation" (section "Method"; block names as in its overview figure):

* Shared STEM: a stride-2 3x3 conv and MobileNetV2 inverted residual
  blocks (:class:`~isr_jax.models.seg_layers.InvertedResidual`) down to stride 8.
* Context branch: further MobileNetV2 stages to strides 16, 32, 64; the
  last two (three for SeaFormer-L) are each followed by a stack of SeaFormer
  layers: ``x + SEA_attention(x)``, then ``x + FFN(x)`` (1x1 conv + norm, 3x3
  depthwise conv, ReLU6, 1x1 conv + norm).
* Squeeze-enhanced Axial attention ("SEA attention"): q, k, v by 1x1 conv + norm;
  q, k, v are averaged along the width (row tokens, one per row) and along the
  height (column tokens), q and k of each get a learned axial positional
  embedding (16 positions, linearly interpolated to the length), multi-head
  softmax attention runs along each axis, each result passes ReLU6 + 1x1 conv +
  norm and is broadcast back and added to v, then ReLU6 + 1x1 conv + norm. The
  detail-enhancement branch, ``concat(q, k, v) -> 3x3 depthwise conv + norm ->
  ReLU6 -> 1x1 conv + norm``, is multiplied by ``h_sigmoid`` of that result.
* Spatial branch and Fusion blocks: the stride-8 stem feature is fused
  with each context stage in turn, ``out = norm(conv1x1(spatial)) *
  up(h_sigmoid(norm(conv1x1(context))))``, all at stride 8.
* Light segmentation head: 1x1 depthwise conv + norm + ReLU, the 1x1
  classifier ``head``, bilinear upsampling to the input size.

Variants (``variant``; fudan-zvg/SeaFormer seaformer-seg configs; parameters at
150 classes as in its README): ``"tiny"`` (1.7 M), ``"small"`` (4.0 M),
``"base"`` (8.6 M), ``"large"`` (14.0 M; attention after three stages). Our
counts: tiny 1,667,318, small 3,990,118, base 8,605,654, large 13,951,510 (150
classes). The default ``"mini"`` (channels 16-64, one block per context stage,
one SeaFormer layer per stage, 2 heads; 141,933 parameters for 5 classes)
trains on a CPU at 64x64.

Simplifications: GroupNorm (MobileNetV2 blocks, spatial side of the fusion,
head) and a per-position LayerNorm (everything in the SeaFormer layers and the
context side of the fusion, which act on maps down to 1x1) instead of
BatchNorm; no dropout / drop-path; no pretrained weights.

Taps, in block order: ``stem_s4``, ``stem_s8`` (shared stem), ``context_s16``,
``context_s32``, ``context_s64`` (context stages, each followed by its SeaFormer
layers' outputs ``sea_s{stride}_{i}`` where present), ``fuse1``, ``fuse2`` (and
``fuse3`` for large; fusion outputs at stride 8) and ``decoder`` (the head's
fused features, the classifier's input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from isr_jax.models.cnn import check_input_shape
from isr_jax.models.seg_layers import (
  ConvFFN,
  ConvNorm,
  InvertedResidual,
  check_variant,
  hard_sigmoid,
  head_init,
  make_divisible,
  multi_head_attention,
  resize,
)
from isr_jax.nn.conv import Conv

# Rows (k, t, c, s) of MobileNetV2 blocks for the five stages after the stem
# conv (output strides 4, 8, 16, 32, 64); SeaFormer layers follow the last
# len(depths) stages. From fudan-zvg/SeaFormer seaformer-seg/local_configs.
VARIANTS = {
    "mini": dict(
        stem_channels=16,
        stages=(((3, 1, 16, 1), (3, 4, 16, 2)), ((5, 3, 24, 2),), ((3, 3, 32, 2),),
                ((5, 3, 48, 2),), ((3, 4, 64, 2),)),
        depths=(1, 1), key_dims=(16, 16), num_heads=2, mlp_ratios=(2, 2),
        embed_dims=(32, 32),
    ),
    "tiny": dict(
        stem_channels=16,
        stages=(((3, 1, 16, 1), (3, 4, 16, 2), (3, 3, 16, 1)),
                ((5, 3, 32, 2), (5, 3, 32, 1)), ((3, 3, 64, 2), (3, 3, 64, 1)),
                ((5, 3, 128, 2),), ((3, 6, 160, 2),)),
        depths=(2, 2), key_dims=(16, 24), num_heads=4, mlp_ratios=(2, 4),
        embed_dims=(64, 96),
    ),
    "small": dict(
        stem_channels=16,
        stages=(((3, 1, 16, 1), (3, 4, 24, 2), (3, 3, 24, 1)),
                ((5, 3, 48, 2), (5, 3, 48, 1)), ((3, 3, 96, 2), (3, 3, 96, 1)),
                ((5, 4, 160, 2),), ((3, 6, 192, 2),)),
        depths=(3, 3), key_dims=(16, 24), num_heads=6, mlp_ratios=(2, 4),
        embed_dims=(96, 128),
    ),
    "base": dict(
        stem_channels=16,
        stages=(((3, 1, 16, 1), (3, 4, 32, 2), (3, 3, 32, 1)),
                ((5, 3, 64, 2), (5, 3, 64, 1)), ((3, 3, 128, 2), (3, 3, 128, 1)),
                ((5, 4, 192, 2),), ((3, 6, 256, 2),)),
        depths=(4, 4), key_dims=(16, 24), num_heads=8, mlp_ratios=(2, 4),
        embed_dims=(128, 160),
    ),
    "large": dict(
        stem_channels=32,
        stages=(((3, 3, 32, 1), (3, 4, 64, 2), (3, 4, 64, 1)),
                ((5, 4, 128, 2), (5, 4, 128, 1)), ((3, 4, 192, 2), (3, 4, 192, 1)),
                ((5, 4, 256, 2),), ((3, 6, 320, 2),)),
        depths=(3, 3, 3), key_dims=(16, 20, 24), num_heads=8, mlp_ratios=(2, 4, 6),
        embed_dims=(128, 160, 192),
    ),
}
STAGE_NAMES = ("stem_s4", "stem_s8", "context_s16", "context_s32", "context_s64")
ATTN_RATIO = 2
POS_EMBED_LENGTH = 16


def _linear_matrix(size: int, length: int) -> np.ndarray:
  """``[length, size]`` weights of PyTorch's ``interpolate(mode="linear", align_corners=False)``."""
  m = np.zeros((length, size), np.float32)
  scale = size / length
  for i in range(length):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(np.floor(src)), size - 1)
    i1 = min(i0 + 1, size - 1)
    frac = src - i0
    m[i, i0] += 1.0 - frac
    m[i, i1] += frac
  return m


def _interp_1d(table: jax.Array, length: int) -> jax.Array:
  """Linear interpolation of a ``[L, C]`` positional table to ``[length, C]``."""
  if table.shape[0] == length:
    return table
  return jnp.asarray(_linear_matrix(table.shape[0], length)) @ table


class SeaAttention(nnx.Module):
  """Squeeze-enhanced Axial attention with the detail-enhancement kernel (SEA attention).

  Args:
    dim: input/output channels.
    key_dim: query/key channels per head.
    num_heads: heads.
    attn_ratio: value channels per head / ``key_dim``.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    kw = dict(norm="layer", conv_impl=conv_impl, rngs=rngs)
    qk_dim = key_dim * num_heads
    value_dim = int(attn_ratio * key_dim) * num_heads
    self.num_heads = num_heads
    self.scale = key_dim ** -0.5
    self.to_q = ConvNorm(dim, qk_dim, 1, **kw)
    self.to_k = ConvNorm(dim, qk_dim, 1, **kw)
    self.to_v = ConvNorm(dim, value_dim, 1, **kw)
    normal = nnx.initializers.normal(1.0)
    pos_embed = lambda: nnx.Param(normal(rngs.params(), (POS_EMBED_LENGTH, qk_dim)))
    self.pos_row_q = pos_embed()
    self.pos_row_k = pos_embed()
    self.pos_column_q = pos_embed()
    self.pos_column_k = pos_embed()
    self.encode_row = ConvNorm(value_dim, value_dim, 1, zero_init=True, **kw)
    self.encode_column = ConvNorm(value_dim, value_dim, 1, zero_init=True, **kw)
    self.proj = ConvNorm(value_dim, dim, 1, zero_init=True, **kw)
    detail = 2 * qk_dim + value_dim
    self.detail_dw = ConvNorm(detail, detail, 3, groups=detail, **kw)
    self.detail_pw = ConvNorm(detail, dim, 1, **kw)

  def _axial(self, q, k, v, pos_q, pos_k):
    """Attention among the squeezed axial tokens ``[B, L, C]``."""
    length = q.shape[1]
    q = q + _interp_1d(pos_q[...], length)
    k = k + _interp_1d(pos_k[...], length)
    return multi_head_attention(q, k, v, self.num_heads, self.scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
    detail = self.detail_pw(jax.nn.relu6(self.detail_dw(jnp.concatenate([q, k, v], -1))))
    # Squeeze along the width: one token per row (H tokens).
    row = self._axial(q.mean(2), k.mean(2), v.mean(2), self.pos_row_q, self.pos_row_k)
    row = self.encode_row(jax.nn.relu6(row[:, :, None, :]))  # [B, H, 1, Cv]
    # Squeeze along the height: one token per column (W tokens).
    column = self._axial(q.mean(1), k.mean(1), v.mean(1), self.pos_column_q,
                         self.pos_column_k)
    column = self.encode_column(jax.nn.relu6(column[:, None, :, :]))  # [B, 1, W, Cv]
    y = self.proj(jax.nn.relu6(v + row + column))
    return hard_sigmoid(y) * detail


class SeaFormerLayer(nnx.Module):
  """``x + SEA_attention(x)``, then ``x + FFN(x)``: one SeaFormer layer.

  Args:
    dim: channels.
    key_dim: query/key channels per head.
    num_heads: heads.
    mlp_ratio: FFN hidden channels / ``dim``.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, dim: int, key_dim: int, num_heads: int, mlp_ratio: float, *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    self.attn = SeaAttention(dim, key_dim, num_heads, ATTN_RATIO, conv_impl=conv_impl,
                             rngs=rngs)
    self.ffn = ConvFFN(dim, int(dim * mlp_ratio), conv_impl=conv_impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(x)
    return x + self.ffn(x)


class Fusion(nnx.Module):
  """Fusion block: ``norm(conv1x1(spatial)) * up(h_sigmoid(norm(conv1x1(context))))``.

  Args:
    spatial_features: channels of the spatial-branch input.
    context_features: channels of the context-branch input.
    out_features: output channels.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, spatial_features: int, context_features: int, out_features: int, *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    self.local_embedding = ConvNorm(spatial_features, out_features, 1, conv_impl=conv_impl,
                                    rngs=rngs)
    self.global_act = ConvNorm(context_features, out_features, 1, norm="layer",
                               conv_impl=conv_impl, rngs=rngs)

  def __call__(self, spatial: jax.Array, context: jax.Array) -> jax.Array:
    gate = resize(hard_sigmoid(self.global_act(context)), spatial.shape[1:3])
    return self.local_embedding(spatial) * gate


class SeaFormer(nnx.Module):
  """SeaFormer for semantic segmentation (Wan et al., ICLR 2023).

  See the module docstring for the architecture, the variants and what is
  simplified.

  Args:
    num_classes: number of classes K.
    input_shape: ``(H, W, C)`` of one example.
    variant: ``"mini"`` (default, CPU-sized), ``"tiny"``, ``"small"``, ``"base"``,
      ``"large"``.
    width_multiplier: scales every channel count of the variant (rounded to a
      multiple of 8).
    depth: SeaFormer layers per attention stage (default: the variant's).
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.

  Raises:
    ConfigError: unknown variant, non-positive width or depth.
  """

  task = "segmentation"

  def __init__(
      self,
      num_classes: int,
      input_shape: Sequence[int],
      *,
      variant: str = "mini",
      width_multiplier: float = 1.0,
      depth: int | None = None,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    _, _, c = self.input_shape = check_input_shape(input_shape, "seaformer")
    self.num_classes = int(num_classes)
    check_variant(VARIANTS, variant, width_multiplier, depth)
    cfg = VARIANTS[variant]
    self.variant = variant
    width = lambda ch: make_divisible(ch * width_multiplier)
    kw = dict(conv_impl=conv_impl, rngs=rngs)
    depths = tuple(depth or d for d in cfg["depths"])
    first_attention = len(STAGE_NAMES) - len(depths)

    in_ch = width(cfg["stem_channels"])
    self.stem_conv = ConvNorm(c, in_ch, 3, stride=2, act="relu", **kw)
    # Each stage: its inverted residuals (ending at the stage's tap), then, in
    # the attention stages, SeaFormer layers (taps sea_s<stride>_<i>). Dicts
    # are keyed by stage for lookup only: after nnx.merge they iterate sorted.
    names, stages, attention, context_channels = [], {}, {}, []
    for j, (name, rows) in enumerate(zip(STAGE_NAMES, cfg["stages"], strict=True)):
      blocks = []
      for k, t, ch, s in rows:
        blocks.append(InvertedResidual(in_ch, width(ch), k, s, t, **kw))
        in_ch = width(ch)
      stages[name] = nnx.List(blocks)
      names.append(name)
      if j >= first_attention:
        a = j - first_attention
        stride = name.split("_s")[1]
        attention[name] = nnx.List([SeaFormerLayer(
            in_ch, cfg["key_dims"][a], cfg["num_heads"], cfg["mlp_ratios"][a], **kw)
                                    for _ in range(depths[a])])
        names.extend(f"sea_s{stride}_{i}" for i in range(depths[a]))
        context_channels.append(in_ch)
      if name == "stem_s8":
        spatial_ch = in_ch
    self.stages = nnx.Dict(stages)
    self.attention = nnx.Dict(attention)

    embed_dims = tuple(width(d) for d in cfg["embed_dims"])
    fusions = []
    for ctx_ch, dim in zip(context_channels, embed_dims, strict=True):
      fusions.append(Fusion(spatial_ch, ctx_ch, dim, **kw))
      spatial_ch = dim
    self.fusions = nnx.List(fusions)
    names.extend(f"fuse{i + 1}" for i in range(len(fusions)))
    head_ch = embed_dims[-1]
    self.linear_fuse = ConvNorm(head_ch, head_ch, 1, groups=head_ch, act="relu", **kw)
    names.append("decoder")
    self.head = Conv(head_ch, self.num_classes, 1, impl=conv_impl, kernel_init=head_init,
                     rngs=rngs)
    self.tap_names = tuple(names)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, H, W, K], taps)`` for an NHWC batch."""
    size = x.shape[1:3]
    taps: dict[str, jax.Array] = {}
    y = self.stem_conv(x)
    contexts = []
    for name in STAGE_NAMES:
      for block in self.stages[name]:
        y = block(y)
      taps[name] = y
      if name in self.attention:
        stride = name.split("_s")[1]
        for i, layer in enumerate(self.attention[name]):
          y = taps[f"sea_s{stride}_{i}"] = layer(y)
        contexts.append(y)
    y = taps["stem_s8"]
    for i, (fusion, context) in enumerate(zip(self.fusions, contexts, strict=True)):
      y = taps[f"fuse{i + 1}"] = fusion(y, context)
    y = taps["decoder"] = self.linear_fuse(y)
    return resize(self.head(y), size), taps
