"""TopFormer (Zhang, Huang, Luo, Chen, Wang, Liu, Yu, Shen, CVPR 2022), with taps.

"TopFormer: Token Pyramid Transformer for Mobile Semantic Segmentation" (§3,
block names as in its architecture overview figure):

* Token Pyramid Module: a stride-2 3x3 conv and MobileNetV2 inverted
  residual blocks (:class:`~isr_jax.models.seg_layers.InvertedResidual`) giving
  tokens at strides 4, 8, 16 and 32; each is average-pooled to the stride-64
  grid (``ceil(H / 64)``, ``c2t_stride = 2`` below stride 32) and the four are
  concatenated along channels.
* Scale-aware Semantics Extractor (vision transformer): a stack of transformer blocks on that
  grid. Attention: q, k, v by 1x1 conv + norm (key dim 16 per head, value dim
  ``attn_ratio * 16 = 32``), softmax attention, ReLU6 and a 1x1 conv + norm
  (scale initialised at zero) back to the embedding; FFN: 1x1 conv + norm, 3x3
  depthwise conv, ReLU6, 1x1 conv + norm (``mlp_ratio = 2``); residual around
  both.
* Semantics Injection Module: the output is split back into per-scale
  global semantics; at strides 8, 16, 32 (the code's ``decode_out_indices``)
  ``local = norm(conv1x1(tokens))``, ``out = local * up(h_sigmoid(norm(conv1x1(g))))
  + up(norm(conv1x1(g)))``.
* Segmentation head: the injected features upsampled to stride 8 and
  summed, 1x1 conv + norm + ReLU (depthwise for TopFormer-T), the 1x1
  classifier ``head``, bilinear upsampling to the input size.

Variants (``variant``; hustvl/TopFormer configs; parameters at 150 classes as in
its README): ``"tiny"`` (pyramid channels 16/32/64/96, 4 heads, SIM/head 128
channels, 1.4 M), ``"small"`` (24/48/96/128, 6 heads, 192, 3.1 M), ``"base"``
(32/64/128/160, 8 heads, 256, 5.1 M); all have 4 transformer blocks. Our counts:
tiny 1,389,654, small 3,034,662, base 5,062,646 (150 classes). The default
``"mini"`` (16/24/32/48 channels, one block per pyramid stage, 2 blocks, 2 heads,
64 channels; 220,461 parameters for 5 classes) trains on a CPU at 64x64.

Simplifications: GroupNorm (convolutional parts) and a per-position LayerNorm
(the transformer and the semantics branches of the SIM, which act on the
stride-64 grid) instead of BatchNorm; no dropout / drop-path; no pretrained
weights. The attention logits are scaled by ``key_dim ** -0.5`` as in the
paper's multi-head attention (the reference code defines but skips that scale).

Taps, in block order (strides for a 64x64 input in brackets): ``stem`` (2),
``tokens_s4``, ``tokens_s8``, ``tokens_s16``, ``tokens_s32`` (the pyramid),
``semantics`` (the transformer output as a map on the stride-64 grid),
``inject_s8``, ``inject_s16``, ``inject_s32`` (SIM outputs) and ``decoder``
(the fused head features at stride 8, the classifier's input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isr_jax.models.cnn import check_input_shape
from isr_jax.models.seg_layers import (
  ConvFFN,
  ConvNorm,
  InvertedResidual,
  adaptive_avg_pool,
  check_variant,
  hard_sigmoid,
  head_init,
  make_divisible,
  multi_head_attention,
  resize,
)
from isr_jax.nn.conv import Conv

# Rows (k, t, c, s) of MobileNetV2 blocks: the block after the stem conv, then
# the four pyramid stages (strides 4, 8, 16, 32). From hustvl/TopFormer's
# local_configs/topformer/topformer_{tiny,small,base}.py.
VARIANTS = {
    "mini": dict(
        stem=((3, 1, 16, 1),),
        stages=(((3, 4, 16, 2),), ((5, 3, 24, 2),), ((3, 3, 32, 2),), ((5, 4, 48, 2),)),
        depth=2, num_heads=2, head_channels=64, depthwise_head=False,
    ),
    "tiny": dict(
        stem=((3, 1, 16, 1),),
        stages=(((3, 4, 16, 2), (3, 3, 16, 1)), ((5, 3, 32, 2), (5, 3, 32, 1)),
                ((3, 3, 64, 2), (3, 3, 64, 1)), ((5, 6, 96, 2), (5, 6, 96, 1))),
        depth=4, num_heads=4, head_channels=128, depthwise_head=True,
    ),
    "small": dict(
        stem=((3, 1, 16, 1),),
        stages=(((3, 4, 24, 2), (3, 3, 24, 1)), ((5, 3, 48, 2), (5, 3, 48, 1)),
                ((3, 3, 96, 2), (3, 3, 96, 1)),
                ((5, 6, 128, 2), (5, 6, 128, 1), (3, 6, 128, 1))),
        depth=4, num_heads=6, head_channels=192, depthwise_head=False,
    ),
    "base": dict(
        stem=((3, 1, 16, 1),),
        stages=(((3, 4, 32, 2), (3, 3, 32, 1)), ((5, 3, 64, 2), (5, 3, 64, 1)),
                ((3, 3, 128, 2), (3, 3, 128, 1)),
                ((5, 6, 160, 2), (5, 6, 160, 1), (3, 6, 160, 1))),
        depth=4, num_heads=8, head_channels=256, depthwise_head=False,
    ),
}
STEM_CHANNELS = 16
KEY_DIM = 16
ATTN_RATIO = 2
MLP_RATIO = 2
PYRAMID_STRIDES = (4, 8, 16, 32)
INJECT_STRIDES = (8, 16, 32)  # the reference's decode_out_indices = (1, 2, 3)


class Attention(nnx.Module):
  """TopFormer multi-head self-attention on a map (tokens = positions).

  Args:
    dim: embedding channels.
    key_dim: query/key channels per head.
    num_heads: heads.
    attn_ratio: value channels per head / ``key_dim``.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    kw = dict(norm="layer", conv_impl=conv_impl, rngs=rngs)
    self.num_heads = num_heads
    self.scale = key_dim ** -0.5
    value_dim = int(attn_ratio * key_dim) * num_heads
    self.to_q = ConvNorm(dim, key_dim * num_heads, 1, **kw)
    self.to_k = ConvNorm(dim, key_dim * num_heads, 1, **kw)
    self.to_v = ConvNorm(dim, value_dim, 1, **kw)
    self.proj = ConvNorm(value_dim, dim, 1, zero_init=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, _ = x.shape
    flat = lambda t: t.reshape(b, h * w, t.shape[-1])
    y = multi_head_attention(flat(self.to_q(x)), flat(self.to_k(x)), flat(self.to_v(x)),
                             self.num_heads, self.scale)
    return self.proj(jax.nn.relu6(y.reshape(b, h, w, -1)))


class TransformerBlock(nnx.Module):
  """``x + attn(x)``, then ``x + ffn(x)``: one Scale-aware Semantics Extractor block.

  Args:
    dim: embedding channels.
    key_dim: query/key channels per head.
    num_heads: heads.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, dim: int, key_dim: int, num_heads: int, *, conv_impl: str = "auto",
               rngs: nnx.Rngs):
    self.attn = Attention(dim, key_dim, num_heads, ATTN_RATIO, conv_impl=conv_impl, rngs=rngs)
    self.ffn = ConvFFN(dim, int(dim * MLP_RATIO), conv_impl=conv_impl, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(x)
    return x + self.ffn(x)


class SemanticsInjection(nnx.Module):
  """Semantics Injection Module: ``local * h_sigmoid(g) + g``.

  Args:
    in_features: channels of the local tokens and of their global semantics.
    out_features: output channels.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, in_features: int, out_features: int, *, conv_impl: str = "auto",
               rngs: nnx.Rngs):
    kw = dict(conv_impl=conv_impl, rngs=rngs)
    self.local_embedding = ConvNorm(in_features, out_features, 1, **kw)
    self.global_act = ConvNorm(in_features, out_features, 1, norm="layer", **kw)
    self.global_embedding = ConvNorm(in_features, out_features, 1, norm="layer", **kw)

  def __call__(self, local: jax.Array, semantics: jax.Array) -> jax.Array:
    size = local.shape[1:3]
    gate = resize(hard_sigmoid(self.global_act(semantics)), size)
    return self.local_embedding(local) * gate + resize(self.global_embedding(semantics), size)


class TopFormer(nnx.Module):
  """TopFormer for semantic segmentation (Zhang et al., CVPR 2022).

  See the module docstring for the architecture, the variants and what is
  simplified.

  Args:
    num_classes: number of classes K.
    input_shape: ``(H, W, C)`` of one example.
    variant: ``"mini"`` (default, CPU-sized), ``"tiny"``, ``"small"``, ``"base"``.
    width_multiplier: scales every channel count of the variant (rounded to a
      multiple of 8, as MobileNet's ``width_mult``).
    depth: number of transformer blocks (default: the variant's).
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
    _, _, c = self.input_shape = check_input_shape(input_shape, "topformer")
    self.num_classes = int(num_classes)
    check_variant(VARIANTS, variant, width_multiplier, depth)
    cfg = VARIANTS[variant]
    depth = cfg["depth"] if depth is None else depth
    self.variant = variant
    width = lambda ch: make_divisible(ch * width_multiplier)
    kw = dict(conv_impl=conv_impl, rngs=rngs)

    # Token Pyramid Module.
    in_ch = width(STEM_CHANNELS)
    self.stem_conv = ConvNorm(c, in_ch, 3, stride=2, act="relu", **kw)
    names = ["stem"]
    blocks = {"stem": cfg["stem"]}
    blocks.update({f"tokens_s{s}": rows for s, rows in zip(PYRAMID_STRIDES, cfg["stages"],
                                                              strict=True)})
    stages = {}
    channels = {}
    for name, rows in blocks.items():
      stage = []
      for k, t, ch, s in rows:
        stage.append(InvertedResidual(in_ch, width(ch), k, s, t, **kw))
        in_ch = width(ch)
      stages[name] = nnx.List(stage)
      channels[name] = in_ch
      if name != "stem":
        names.append(name)
    # Keyed by the tap each stage ends at, for lookup only (after nnx.merge a
    # Dict iterates in sorted order): the forward pass walks stage_names.
    self.stages = nnx.Dict(stages)
    self.stage_names = tuple(stages)
    self.pyramid_channels = tuple(channels[f"tokens_s{s}"] for s in PYRAMID_STRIDES)

    # Scale-aware Semantics Extractor on the concatenated pooled tokens.
    self.embed_dim = sum(self.pyramid_channels)
    self.depth = depth
    self.transformers = nnx.List(
        [TransformerBlock(self.embed_dim, KEY_DIM, cfg["num_heads"], **kw) for _ in range(depth)])
    names.append("semantics")

    # Semantics Injection Modules and the segmentation head.
    head_ch = width(cfg["head_channels"])
    self.injections = nnx.Dict({
        f"inject_s{s}": SemanticsInjection(channels[f"tokens_s{s}"], head_ch, **kw)
        for s in INJECT_STRIDES})
    names.extend(f"inject_s{s}" for s in INJECT_STRIDES)
    self.linear_fuse = ConvNorm(head_ch, head_ch, 1, groups=head_ch if cfg["depthwise_head"]
                                else 1, act="relu", **kw)
    names.append("decoder")
    self.head = Conv(head_ch, self.num_classes, 1, impl=conv_impl, kernel_init=head_init,
                     rngs=rngs)
    self.tap_names = tuple(names)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, H, W, K], taps)`` for an NHWC batch."""
    size = x.shape[1:3]
    taps: dict[str, jax.Array] = {}
    y = self.stem_conv(x)
    for name in self.stage_names:
      for block in self.stages[name]:
        y = block(y)
      taps[name] = y
    pyramid = [taps[f"tokens_s{s}"] for s in PYRAMID_STRIDES]
    last = pyramid[-1].shape[1:3]
    grid = ((last[0] - 1) // 2 + 1, (last[1] - 1) // 2 + 1)  # c2t_stride = 2
    y = jnp.concatenate([adaptive_avg_pool(t, grid) for t in pyramid], axis=-1)
    for block in self.transformers:
      y = block(y)
    taps["semantics"] = y
    offsets = [0]
    for ch in self.pyramid_channels:
      offsets.append(offsets[-1] + ch)
    fused = None
    for s in INJECT_STRIDES:
      j = PYRAMID_STRIDES.index(s)
      semantics = y[..., offsets[j]:offsets[j + 1]]
      out = taps[f"inject_s{s}"] = self.injections[f"inject_s{s}"](taps[f"tokens_s{s}"],
                                                                   semantics)
      fused = out if fused is None else fused + resize(out, fused.shape[1:3])
    fused = taps["decoder"] = self.linear_fuse(fused)
    return resize(self.head(fused), size), taps
