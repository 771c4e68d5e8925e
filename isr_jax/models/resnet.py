"""ResNet-18 (He, Zhang, Ren, Sun, CVPR 2016) with GroupNorm, as a reusable backbone.

"Deep Residual Learning for Image Recognition": BasicBlock ResNet-18, four
stages of two residual blocks with [64, 128, 256, 512] channels. Normalisation
is GroupNorm (Wu & He, ECCV 2018) in place of BatchNorm, so the model is one
``nnx.Param`` tree that averages across clients.

:class:`ResNetBackbone` returns ``(last_feature_map, taps)`` and can trade the
strides of stages 2-4 for dilation (Chen et al., DeepLab; torchvision's
``replace_stride_with_dilation``) so that a segmentation head (DeepLabv3+) can
reuse it at output stride 16 or 8. :class:`ResNet18` is backbone + global
average pool + linear ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.models.cnn import check_input_shape
from isr_jax.models.projection import (
  PROJECTION_TAP,
  check_projection_dim,
  make_projection,
  project,
)
from isr_jax.nn.conv import Conv
from isr_jax.nn.dense import linear
from isr_jax.nn.norm import group_norm
from isr_jax.nn.pooling import global_avg_pool, max_pool

STEMS = ("cifar", "imagenet")
STAGE_CHANNELS = (64, 128, 256, 512)

# He et al. (ICCV 2015) initialisation, fan-out, as torchvision's ResNet.
he_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def scaled_channels(channels: int, width_multiplier: float) -> int:
  """``round(channels * width_multiplier)``, at least 1."""
  return max(1, int(round(channels * width_multiplier)))


def _conv(in_ch, out_ch, k, *, stride=1, dilation=1, conv_impl, rngs) -> Conv:
  """Bias-free conv with PyTorch-style symmetric padding ``dilation * (k - 1) // 2``.

  For odd ``k`` this gives ``ceil(size / stride)`` outputs for every size >= 1,
  with torchvision's alignment of the strided samples.
  """
  return Conv(
      in_ch, out_ch, k, strides=stride, padding=dilation * (k - 1) // 2, dilation=dilation,
      use_bias=False, impl=conv_impl, kernel_init=he_fan_out, rngs=rngs,
  )


class BasicBlock(nnx.Module):
  """Two 3x3 convs with GroupNorm and an identity or 1x1-conv projection shortcut.

  ``x -> conv1(stride) -> GN -> ReLU -> conv2 -> GN (+ shortcut) -> ReLU``. The
  shortcut is a 1x1 conv (same stride) + GroupNorm when the stride or the
  channel count changes (He et al.'s option B).

  Args:
    in_features: input channels.
    out_features: output channels.
    stride: stride of ``conv1`` and of the projection shortcut.
    dilations: dilation of ``conv1`` and ``conv2``. In a stage whose stride was
      replaced by dilation, the first block keeps the previous dilation on
      ``conv1`` (the conv that would have strided) and uses the new one on
      ``conv2``, which then sees the same context as at the lower resolution.
    zero_init_residual: start the last GroupNorm's scale at zero, so the block
      starts as its shortcut (Goyal et al. 2017).
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      stride: int = 1,
      dilations: tuple[int, int] = (1, 1),
      zero_init_residual: bool = False,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.conv1 = _conv(in_features, out_features, 3, stride=stride, dilation=dilations[0],
                       conv_impl=conv_impl, rngs=rngs)
    self.norm1 = group_norm(out_features, rngs=rngs)
    self.conv2 = _conv(out_features, out_features, 3, dilation=dilations[1],
                       conv_impl=conv_impl, rngs=rngs)
    self.norm2 = group_norm(out_features, rngs=rngs)
    if zero_init_residual:
      self.norm2.scale[...] = jnp.zeros_like(self.norm2.scale[...])
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = _conv(in_features, out_features, 1, stride=stride,
                                 conv_impl=conv_impl, rngs=rngs)
      self.shortcut_norm = group_norm(out_features, rngs=rngs)
    else:
      self.shortcut_conv = None
      self.shortcut_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = nnx.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    if self.shortcut_conv is not None:
      x = self.shortcut_norm(self.shortcut_conv(x))
    return nnx.relu(y + x)


class ResNetBackbone(nnx.Module):
  """BasicBlock ResNet body (stem + 4 stages) returning ``(last_map, taps)``.

  He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), with
  GroupNorm. Stem ``"cifar"``: conv 3x3/1 -> GN -> ReLU (no max-pool), output
  stride 8 at the end. Stem ``"imagenet"``: conv 7x7/2 (padding 3) -> GN ->
  ReLU -> max-pool 3x3/2 (padding 1), output stride 32. Stages 2-4 start with a
  stride-2 block; ``replace_stride_with_dilation[i]`` replaces the stride of
  stage ``i + 2`` by dilation (torchvision semantics), so ``(False, False,
  True)`` halves the output stride and ``(False, True, True)`` quarters it.

  All convs use PyTorch-style symmetric padding, so each stride-2 layer maps a
  size ``s`` to ``ceil(s / 2)`` and tiny inputs (8x8) reach a 1x1 map instead of
  failing.

  Taps: ``stem`` then ``layer{stage}_{block}`` (each block's output), e.g.
  ``layer1_0 ... layer4_1`` for ResNet-18. ``tap_strides`` gives each tap's
  stride relative to the input (for DeepLabv3+'s low-level features).

  Args:
    input_shape: ``(H, W, C)`` of one example (only ``C`` shapes parameters).
    stem: ``"cifar"`` or ``"imagenet"``.
    width_multiplier: scales the stage (and stem) channels.
    replace_stride_with_dilation: for stages 2, 3, 4.
    blocks_per_stage: residual blocks per stage; ``(2, 2, 2, 2)`` is ResNet-18.
    zero_init_residual: see :class:`BasicBlock`.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      *,
      stem: str = "cifar",
      width_multiplier: float = 1.0,
      replace_stride_with_dilation: Sequence[bool] = (False, False, False),
      blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
      zero_init_residual: bool = False,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    _, _, c = check_input_shape(input_shape, "resnet")
    if stem not in STEMS:
      raise ConfigError(f"model.stem={stem!r} is not one of {list(STEMS)}")
    if not width_multiplier > 0:
      raise ConfigError(f"model.width_multiplier={width_multiplier!r} must be > 0")
    dilate = tuple(bool(v) for v in replace_stride_with_dilation)
    if len(dilate) != 3:
      raise ConfigError(
          f"model.replace_stride_with_dilation={tuple(replace_stride_with_dilation)!r} "
          "must have 3 booleans (stages 2, 3, 4)"
      )
    blocks = tuple(int(b) for b in blocks_per_stage)
    if len(blocks) != 4 or min(blocks) < 1:
      raise ConfigError(
          f"model.blocks_per_stage={tuple(blocks_per_stage)!r} must be 4 counts >= 1"
      )
    self.stem_type = stem
    self.replace_stride_with_dilation = dilate
    self.blocks_per_stage = blocks
    self.stage_channels = tuple(scaled_channels(ch, width_multiplier) for ch in STAGE_CHANNELS)
    self.out_channels = self.stage_channels[-1]

    stem_ch = self.stage_channels[0]
    if stem == "cifar":
      self.stem_conv = _conv(c, stem_ch, 3, conv_impl=conv_impl, rngs=rngs)
      stride = 1
    else:
      self.stem_conv = _conv(c, stem_ch, 7, stride=2, conv_impl=conv_impl, rngs=rngs)
      stride = 4
    self.stem_norm = group_norm(stem_ch, rngs=rngs)

    names, strides, residual_blocks = ["stem"], [stride], {}
    dilation, in_ch = 1, stem_ch
    for s, (ch, n) in enumerate(zip(self.stage_channels, blocks, strict=True)):
      block_stride, previous_dilation = (1 if s == 0 else 2), dilation
      if s > 0 and dilate[s - 1]:
        dilation *= block_stride
        block_stride = 1
      stride *= block_stride
      for b in range(n):
        first = b == 0
        block = BasicBlock(
            in_ch, ch, stride=block_stride if first else 1,
            dilations=(previous_dilation if first else dilation, dilation),
            zero_init_residual=zero_init_residual, conv_impl=conv_impl, rngs=rngs,
        )
        name = f"layer{s + 1}_{b}"
        residual_blocks[name] = block
        names.append(name)
        strides.append(stride)
        in_ch = ch
    # Keyed by tap name so parameter paths say which block they belong to; the
    # order lives in tap_names because nnx.Dict iterates sorted after a merge.
    self.blocks = nnx.Dict(residual_blocks)
    self.tap_names = tuple(names)
    self.tap_strides = tuple(strides)
    self.output_stride = stride

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(last feature map [B, H/os, W/os, C], taps)``."""
    taps: dict[str, jax.Array] = {}
    x = nnx.relu(self.stem_norm(self.stem_conv(x)))
    if self.stem_type == "imagenet":
      x = max_pool(x, 3, 2, padding=1)
    taps["stem"] = x
    for name in self.tap_names[1:]:
      x = taps[name] = self.blocks[name](x)
    return x, taps


class ResNet18(nnx.Module):
  """ResNet-18 classifier (He et al., CVPR 2016) with GroupNorm.

  :class:`ResNetBackbone` (CIFAR stem by default) -> global average pool ->
  linear ``head``. With width 1, the CIFAR stem and 10 classes it has
  11,173,962 parameters, the count of torchvision's CIFAR ResNet-18 (GroupNorm
  has as many parameters as BatchNorm).

  Taps: ``stem``, ``layer1_0`` ... ``layer4_1`` and ``features`` (the pooled
  ``[B, 512 * width_multiplier]`` vector), then ``projection`` (the head's
  input instead) with a projection head.

  Args:
    num_classes: number of output logits K.
    input_shape: ``(H, W, C)`` of one example.
    stem: ``"cifar"`` (conv 3x3/1, no max-pool) or ``"imagenet"`` (conv 7x7/2 +
      max-pool 3x3/2).
    width_multiplier: scales every stage's channels.
    replace_stride_with_dilation: see :class:`ResNetBackbone`.
    zero_init_residual: see :class:`BasicBlock`.
    projection_dim: MOON's projection head between ``features`` and the output
      layer, of this output width (0 = none); see :mod:`isr_jax.models.projection`.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  task = "classification"

  def __init__(
      self,
      num_classes: int,
      input_shape: Sequence[int],
      *,
      stem: str = "cifar",
      width_multiplier: float = 1.0,
      replace_stride_with_dilation: Sequence[bool] = (False, False, False),
      zero_init_residual: bool = False,
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.input_shape = check_input_shape(input_shape, "resnet18")
    projection_dim = check_projection_dim(projection_dim, "resnet18")
    self.num_classes = int(num_classes)
    self.backbone = ResNetBackbone(
        input_shape, stem=stem, width_multiplier=width_multiplier,
        replace_stride_with_dilation=replace_stride_with_dilation,
        blocks_per_stage=(2, 2, 2, 2), zero_init_residual=zero_init_residual,
        conv_impl=conv_impl, rngs=rngs,
    )
    self.tap_names = (*self.backbone.tap_names, "features",
                      *((PROJECTION_TAP,) if projection_dim else ()))
    self.projection, head_in = make_projection(self.backbone.out_channels, projection_dim,
                                               rngs=rngs)
    self.head = linear(head_in, self.num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, K], taps)`` for an NHWC batch."""
    x, taps = self.backbone(x)
    x = taps["features"] = global_avg_pool(x)
    return self.head(project(self.projection, x, taps)), taps
