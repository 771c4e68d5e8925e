"""Small classification ConvNets from the federated-learning literature, with taps.

Every model maps an NHWC float32 batch to ``(logits, taps)``: ``taps`` holds the
named intermediate features listed, input side first, in ``tap_names``; the last
one is the ``[B, D]`` input of the output layer ``self.head``: ``"features"``
(the encoder's output), or ``"projection"`` with MOON's projection head
(``projection_dim > 0``, :mod:`isr_jax.models.projection`). Parameters under
``"head"`` are the head, everything else (the projection head too) is the body.

Convolutions and pooling come from :mod:`isr_jax.nn` (see there for
why); normalisation is GroupNorm, so a model is exactly one ``nnx.Param`` tree.

The classic architectures were drawn for 28x28 or 32x32 inputs. To also fit
8x8 inputs (scikit-learn digits) they follow one rule, stated per model: a 2x2
max-pool is skipped once the feature map is smaller than 2x2 (it would leave no
output), and LeNet-5's VALID convolutions turn to SAME padding where VALID would
not leave a map the following pool can halve.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.models.projection import (
  PROJECTION_TAP,
  check_projection_dim,
  make_projection,
  project,
)
from isr_jax.nn.conv import Conv
from isr_jax.nn.dense import linear
from isr_jax.nn.norm import group_norm
from isr_jax.nn.pooling import max_pool


def check_input_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
  """Validates an ``(H, W, C)`` input shape and returns it as a tuple of ints.

  Args:
    input_shape: height, width, channels of one example.
    model: the model's config name, for the error message.

  Returns:
    ``(H, W, C)`` as Python ints.

  Raises:
    ConfigError: the shape is not three positive sizes.
  """
  shape = tuple(int(d) for d in input_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(
        f"model.input_shape={tuple(input_shape)!r} for {model} must be (height, width, "
        "channels) with every size >= 1"
    )
  return shape  # type: ignore[return-value]


def _can_pool(h: int, w: int) -> bool:
  """Whether a 2x2/2 max-pool leaves at least a 1x1 map."""
  return h >= 2 and w >= 2


def _pool_size(h: int, w: int) -> tuple[int, int]:
  """Spatial size after :func:`_pool2` (floor mode, skipped below 2x2)."""
  return (h // 2, w // 2) if _can_pool(h, w) else (h, w)


def _pool2(x: jax.Array, stored_input: bool = False) -> jax.Array:
  """2x2/2 max-pool, or the identity once the map is smaller than 2x2."""
  if not _can_pool(x.shape[1], x.shape[2]):
    return x
  return max_pool(x, 2, 2, stored_input=stored_input)


def _conv_relu_pool(conv: Conv, x: jax.Array, taps: dict[str, jax.Array], conv_tap: str,
                    pool_tap: str) -> jax.Array:
  """``pool(relu(conv(x) + b))``, computed as ``relu(pool(conv(x)) + b)``.

  Equal values: adding one bias per channel and ReLU are both non-decreasing, so
  they commute with the max (also in float arithmetic). Pooling first puts the
  bias, the ReLU and their backward on a map 4× smaller, and the pool's backward
  no longer recomputes them: XLA's per-step kernel time of a 28×28 LeNet-5 step
  fell from 8.1 to 6.9 ms (benchmarks/RESULTS.md §7). It also pools a stored
  convolution output, whose backward pass may compare with the stored maxima
  (``max_pool(stored_input=True)``). The ``conv_tap`` (after ReLU, before
  pooling) is only computed when a loss reads it.
  """
  z = conv.convolve(x)
  b = conv.bias[...]
  taps[conv_tap] = nnx.relu(z + b)
  taps[pool_tap] = nnx.relu(_pool2(z, stored_input=True) + b)
  return taps[pool_tap]


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class FedAvgCNN(nnx.Module):
  """The "CNN" of FedAvg (McMahan et al., AISTATS 2017).

  McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data": two 5x5 convolutions (32
  and 64 channels, SAME padding), each followed by ReLU and 2x2 max-pooling, a
  fully connected layer of 512 units with ReLU and a linear output layer
  (1,663,370 parameters at 28x28x1 with 10 classes).

  SAME padding makes every input size work; at 8x8 the maps are 8 -> 4 -> 2 and
  a pool is skipped once the map is smaller than 2x2.

  Taps: ``conv1`` (after ReLU, before pooling), ``pool1``, ``conv2``, ``pool2``
  and ``features`` (the 512-unit layer after ReLU), then ``projection`` with a
  projection head.

  Args:
    num_classes: number of output logits K.
    input_shape: ``(H, W, C)`` of one example.
    hidden_units: width of the fully connected layer (512 in the paper).
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
      hidden_units: int = 512,
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    h, w, c = check_input_shape(input_shape, "fedavg_cnn")
    projection_dim = check_projection_dim(projection_dim, "fedavg_cnn")
    self.input_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.conv1 = Conv(c, 32, 5, padding="SAME", impl=conv_impl, rngs=rngs)
    self.conv2 = Conv(32, 64, 5, padding="SAME", impl=conv_impl, rngs=rngs)
    h, w = _pool_size(*_pool_size(h, w))
    self.fc1 = linear(h * w * 64, hidden_units, rngs=rngs)
    self.projection, head_in = make_projection(hidden_units, projection_dim, rngs=rngs)
    self.head = linear(head_in, self.num_classes, rngs=rngs)
    self.tap_names = ("conv1", "pool1", "conv2", "pool2", "features",
                      *((PROJECTION_TAP,) if projection_dim else ()))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, K], taps)`` for an NHWC batch."""
    taps: dict[str, jax.Array] = {}
    x = _conv_relu_pool(self.conv1, x, taps, "conv1", "pool1")
    x = _conv_relu_pool(self.conv2, x, taps, "conv2", "pool2")
    x = taps["features"] = nnx.relu(self.fc1(_flatten(x)))
    return self.head(project(self.projection, x, taps)), taps


class LeNet5(nnx.Module):
  """LeNet-5 (LeCun, Bottou, Bengio, Haffner, Proc. IEEE 1998), modern variant.

  "Gradient-Based Learning Applied to Document Recognition": conv 5x5 with 6
  channels -> pool -> conv 5x5 with 16 channels -> pool -> fc 120 -> fc 84 ->
  output, here with ReLU activations, max-pooling, a full C3 connection table
  and a linear output layer in place of the RBF units (the usual modern form).

  Padding rule: the paper feeds 32x32 images (28x28 digits centred in a 32x32
  field) to VALID convolutions. Inputs smaller than 32x32 get ``conv1`` with
  padding 2 (equivalent to that centring for 28x28: 28 -> 28 -> 14 -> 10 -> 5,
  as at 32x32 with VALID: 32 -> 28 -> 14 -> 10 -> 5; 400 features into fc1).
  ``conv2`` is VALID when its input is at least 6x6 (so that the 2x2 pool after
  it has a map to halve) and SAME otherwise: at 8x8 the maps are
  8 -> 8 -> 4 -> 4 -> 2. A pool is skipped once the map is smaller than 2x2.

  Taps: ``conv1``, ``conv2`` (after ReLU, before pooling), ``pool1``,
  ``pool2``, ``fc1`` (120 units after ReLU) and ``features`` (84 units after
  ReLU), then ``projection`` with a projection head. With
  ``projection_dim=256`` this is MOON's CIFAR-10 network (Li et al. 2021, §4.1:
  this encoder, a 2-layer MLP projection head of output 256, the output layer).

  Args:
    num_classes: number of output logits K.
    input_shape: ``(H, W, C)`` of one example.
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
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    h, w, c = check_input_shape(input_shape, "lenet5")
    projection_dim = check_projection_dim(projection_dim, "lenet5")
    self.input_shape = (h, w, c)
    self.num_classes = int(num_classes)
    pad1 = 2 if min(h, w) < 32 else "VALID"
    self.conv1 = Conv(c, 6, 5, padding=pad1, impl=conv_impl, rngs=rngs)
    if pad1 == "VALID":
      h, w = h - 4, w - 4
    h, w = _pool_size(h, w)
    pad2 = "VALID" if min(h, w) >= 6 else "SAME"
    self.conv2 = Conv(6, 16, 5, padding=pad2, impl=conv_impl, rngs=rngs)
    if pad2 == "VALID":
      h, w = h - 4, w - 4
    h, w = _pool_size(h, w)
    self.fc1 = linear(h * w * 16, 120, rngs=rngs)
    self.fc2 = linear(120, 84, rngs=rngs)
    self.projection, head_in = make_projection(84, projection_dim, rngs=rngs)
    self.head = linear(head_in, self.num_classes, rngs=rngs)
    self.tap_names = ("conv1", "pool1", "conv2", "pool2", "fc1", "features",
                      *((PROJECTION_TAP,) if projection_dim else ()))

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, K], taps)`` for an NHWC batch."""
    taps: dict[str, jax.Array] = {}
    x = _conv_relu_pool(self.conv1, x, taps, "conv1", "pool1")
    x = _conv_relu_pool(self.conv2, x, taps, "conv2", "pool2")
    x = taps["fc1"] = nnx.relu(self.fc1(_flatten(x)))
    x = taps["features"] = nnx.relu(self.fc2(x))
    return self.head(project(self.projection, x, taps)), taps


class ConvBlock(nnx.Module):
  """conv 3x3 (padding 1) -> GroupNorm -> ReLU -> 2x2 max-pool (skipped below 2x2)."""

  def __init__(self, in_features: int, out_features: int, *, conv_impl: str, rngs: nnx.Rngs):
    self.conv = Conv(in_features, out_features, 3, padding=1, impl=conv_impl, rngs=rngs)
    self.norm = group_norm(out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _pool2(nnx.relu(self.norm(self.conv(x))))


class ConvNet(nnx.Module):
  """The N-layer ConvNet of FedBABU (Oh, Kim, Yun, ICLR 2022) and FedAIMS.

  Oh et al., "FedBABU: Towards Enhanced Representation for Federated Image
  Classification" use a "4convNet" on CIFAR-10: four blocks of conv 3x3 with 64
  channels (padding 1) -> BatchNorm -> ReLU -> 2x2 max-pool, flattened into a
  linear classifier (64*2*2 = 256 features at 32x32). FedAIMS ("Federated
  Adaptive Intermediate Supervision") follows FedBABU with a 3-layer ConvNet
  for EMNIST and the 4-layer one for CIFAR-10; the paper gives no further
  detail. Here BatchNorm is replaced by GroupNorm (32 groups, or the largest
  divisor of the width below that) so the model is one parameter tree that
  averages across clients.

  A block's 2x2 pool is skipped once the map is smaller than 2x2, so at 8x8 the
  maps are 8 -> 4 -> 2 -> 1 (-> 1). At 28x28: 14, 7, 3 (-> 1).

  Taps: ``block1`` ... ``blockN`` (each block's pooled output) and ``features``
  (the flattened last block, the classifier's input), then ``projection``
  (the classifier's input instead) with a projection head.

  Args:
    num_classes: number of output logits K.
    input_shape: ``(H, W, C)`` of one example.
    depth: number of conv blocks N.
    width: channels of every block (64 in the papers).
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
      depth: int,
      width: int = 64,
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    name = f"convnet{depth}"
    h, w, c = check_input_shape(input_shape, name)
    projection_dim = check_projection_dim(projection_dim, name)
    if int(depth) < 1:
      raise ConfigError(f"model.depth={depth!r} for ConvNet must be >= 1")
    if int(width) < 1:
      raise ConfigError(f"model.width={width!r} for {name} must be >= 1")
    self.input_shape = (h, w, c)
    self.num_classes = int(num_classes)
    self.depth = int(depth)
    self.width = int(width)
    self.tap_names = (*(f"block{i}" for i in range(1, self.depth + 1)), "features",
                      *((PROJECTION_TAP,) if projection_dim else ()))
    blocks, in_ch = [], c
    for _ in range(self.depth):
      blocks.append(ConvBlock(in_ch, self.width, conv_impl=conv_impl, rngs=rngs))
      in_ch = self.width
      h, w = _pool_size(h, w)
    self.blocks = nnx.List(blocks)
    self.projection, head_in = make_projection(h * w * self.width, projection_dim, rngs=rngs)
    self.head = linear(head_in, self.num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns ``(logits [B, K], taps)`` for an NHWC batch."""
    taps: dict[str, jax.Array] = {}
    for i, block in enumerate(self.blocks, start=1):
      x = taps[f"block{i}"] = block(x)
    x = taps["features"] = _flatten(x)
    return self.head(project(self.projection, x, taps)), taps


class ConvNet3(ConvNet):
  """3-layer ConvNet (FedAIMS/FedBABU on EMNIST); see :class:`ConvNet`."""

  def __init__(
      self,
      num_classes: int,
      input_shape: Sequence[int],
      *,
      width: int = 64,
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    super().__init__(num_classes, input_shape, depth=3, width=width,
                     projection_dim=projection_dim, conv_impl=conv_impl, rngs=rngs)


class ConvNet4(ConvNet):
  """4-layer ConvNet, FedBABU's "4convNet" (CIFAR-10); see :class:`ConvNet`."""

  def __init__(
      self,
      num_classes: int,
      input_shape: Sequence[int],
      *,
      width: int = 64,
      projection_dim: int = 0,
      conv_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    super().__init__(num_classes, input_shape, depth=4, width=width,
                     projection_dim=projection_dim, conv_impl=conv_impl, rngs=rngs)
