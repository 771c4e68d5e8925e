"""DeepLabv3+ (Chen, Zhu, Papandreou, Schroff, Adam, ECCV 2018) on ResNet-18, with taps.

"Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation". The OmniISR paper (Table III) uses it with a ResNet-18 backbone.

* Encoder (§3.1, Fig. 2): :class:`~isr_jax.models.resnet.ResNetBackbone` with the
  ImageNet stem (conv 7x7/2 + max-pool 3x3/2), output stride 16 by trading stage
  4's stride for dilation (``replace_stride_with_dilation=(False, False, True)``),
  or 8 by also dilating stage 3.
* ASPP (DeepLabv3, Chen et al. 2017, §3.3; Fig. 2 here): a 1x1 conv, three 3x3
  atrous convs at rates (6, 12, 18) for output stride 16 (doubled for 8), and
  image pooling (global average pool -> 1x1 conv -> broadcast back), each 256
  channels with norm + ReLU, concatenated and projected by a 1x1 conv to 256.
* Decoder (§3.1, §4.1): the stride-4 low-level features (output of ``layer1``)
  reduced by a 1x1 conv to 48 channels, concatenated with the ASPP output
  upsampled bilinearly to stride 4, two 3x3 convs of 256 channels (the variant
  §4.1 found best), the 1x1 classifier ``head``, and bilinear upsampling to the
  input size.

Simplifications: GroupNorm instead of BatchNorm, no dropout, no pretrained
ImageNet weights, plain (not depthwise-separable) ASPP/decoder convs as in the
common ResNet ports (torchvision, VainF/DeepLabV3Plus-Pytorch).

Published configuration: ``width_multiplier=1.0`` (ResNet-18 channels 64-512,
ASPP/decoder 256, low-level 48), ``output_stride=16``, ``atrous_rates=(6, 12,
18)``: 16,607,667 parameters for 19 classes (11,176,512 in the backbone, as
torchvision's ResNet-18 without its classifier). The default
``width_multiplier=0.25`` is a CPU-sized model (1,042,349 parameters for 5
classes).

Taps, in block order: the backbone's ``stem`` (stride 4), ``layer1_0`` ...
``layer4_1``, then ``aspp`` (after the projection, stride ``output_stride``) and
``decoder`` (after the two fusion convs, stride 4; the classifier's input).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.models.cnn import check_input_shape
from isr_jax.models.resnet import ResNetBackbone, scaled_channels
from isr_jax.models.seg_layers import ConvNorm, head_init, resize
from isr_jax.nn.conv import Conv
from isr_jax.nn.pooling import global_avg_pool

OUTPUT_STRIDES = (8, 16)
# DeepLabv3 §3.3: rates (6, 12, 18) at output stride 16, doubled at 8.
ATROUS_RATES_OS16 = (6, 12, 18)


class ASPP(nnx.Module):
  """Atrous Spatial Pyramid Pooling (DeepLabv3 §3.3) with image-level features.

  Args:
    in_features: backbone channels.
    out_features: channels of every branch and of the projection (256).
    rates: atrous rates of the 3x3 branches.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.
  """

  def __init__(self, in_features: int, out_features: int, rates: Sequence[int], *,
               conv_impl: str = "auto", rngs: nnx.Rngs):
    kw = dict(act="relu", conv_impl=conv_impl, rngs=rngs)
    self.rates = tuple(int(r) for r in rates)
    self.branch0 = ConvNorm(in_features, out_features, 1, **kw)
    self.atrous = nnx.List(
        [ConvNorm(in_features, out_features, 3, dilation=rate, **kw) for rate in self.rates])
    self.pool = ConvNorm(in_features, out_features, 1, **kw)
    self.project = ConvNorm((len(self.rates) + 2) * out_features, out_features, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    branches = [self.branch0(x)]
    branches += [branch(x) for branch in self.atrous]
    pooled = self.pool(global_avg_pool(x)[:, None, None, :])
    branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], pooled.shape[-1])))
    return self.project(jnp.concatenate(branches, axis=-1))


class DeepLabV3Plus(nnx.Module):
  """DeepLabv3+ with a GroupNorm ResNet-18 backbone (Chen et al., ECCV 2018, Fig. 2).

  See the module docstring for the architecture, the published settings and
  what is simplified.

  Args:
    num_classes: number of classes K (logits per pixel).
    input_shape: ``(H, W, C)`` of one example.
    width_multiplier: scales the backbone's, ASPP's and decoder's channels;
      ``1.0`` is the published model, the default ``0.25`` a CPU-sized one.
    output_stride: 16 (the paper's default) or 8.
    atrous_rates: ASPP rates; default ``(6, 12, 18)`` at output stride 16 and
      ``(12, 24, 36)`` at 8. On small inputs (e.g. 64x64, a 4x4 map at output
      stride 16) rates beyond the map only see padding; pass smaller ones.
    conv_impl: convolution lowering, see :class:`isr_jax.nn.conv.Conv`.
    rngs: initialisation randomness.

  Raises:
    ConfigError: ``output_stride`` not 8 or 16, or rates that are not positive.
  """

  task = "segmentation"

  def __init__(
      self,
      num_classes: int,
      input_shape: Sequence[int],
      *,
      width_multiplier: float = 0.25,
      output_stride: int = 16,
      atrous_rates: Sequence[int] | None = None,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.input_shape = check_input_shape(input_shape, "deeplabv3plus")
    self.num_classes = int(num_classes)
    if output_stride not in OUTPUT_STRIDES:
      raise ConfigError(
          f"model.output_stride={output_stride!r} is not one of {list(OUTPUT_STRIDES)}"
      )
    if atrous_rates is None:
      atrous_rates = tuple(r * 16 // output_stride for r in ATROUS_RATES_OS16)
    rates = tuple(atrous_rates)
    if not rates or any(not isinstance(r, int) or r < 1 for r in rates):
      raise ConfigError(f"model.atrous_rates={rates!r} must be positive integers")
    self.output_stride = int(output_stride)
    self.backbone = ResNetBackbone(
        input_shape, stem="imagenet", width_multiplier=width_multiplier,
        replace_stride_with_dilation=(False, output_stride == 8, True),
        conv_impl=conv_impl, rngs=rngs,
    )
    self.low_level_tap = f"layer1_{self.backbone.blocks_per_stage[0] - 1}"
    low_ch = self.backbone.stage_channels[0]
    aspp_ch = scaled_channels(256, width_multiplier)
    reduced_ch = scaled_channels(48, width_multiplier)
    kw = dict(act="relu", conv_impl=conv_impl, rngs=rngs)
    self.aspp = ASPP(self.backbone.out_channels, aspp_ch, rates, conv_impl=conv_impl,
                     rngs=rngs)
    self.reduce = ConvNorm(low_ch, reduced_ch, 1, **kw)
    self.fuse1 = ConvNorm(aspp_ch + reduced_ch, aspp_ch, 3, **kw)
    self.fuse2 = ConvNorm(aspp_ch, aspp_ch, 3, **kw)
    self.head = Conv(aspp_ch, self.num_classes, 1, impl=conv_impl, kernel_init=head_init,
                     rngs=rngs)
    self.tap_names = (*self.backbone.tap_names, "aspp", "decoder")

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, H, W, K], taps)`` for an NHWC batch."""
    size = x.shape[1:3]
    y, taps = self.backbone(x)
    y = taps["aspp"] = self.aspp(y)
    low = self.reduce(taps[self.low_level_tap])
    y = jnp.concatenate([resize(y, low.shape[1:3]), low], axis=-1)
    y = taps["decoder"] = self.fuse2(self.fuse1(y))
    return resize(self.head(y), size), taps
