"""Tests for the classification models with taps and their registry."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.models import (
    MODELS,
    BasicBlock,
    FedAvgCNN,
    ResNet18,
    ResNetBackbone,
    create_model,
    model_options,
)

B = 2
K = 10
SHAPES = ((8, 8, 1), (28, 28, 1), (32, 32, 3))
# ResNet-18 at width 0.25 (stages 16, 32, 64, 128 channels) where only shapes matter.
SMALL = {"resnet18": {"width_multiplier": 0.25}}

# Tap shapes (without the batch axis) at 28x28x1, written out from each architecture.
EXPECTED_28 = {
    "fedavg_cnn": {
        "conv1": (28, 28, 32), "pool1": (14, 14, 32), "conv2": (14, 14, 64),
        "pool2": (7, 7, 64), "features": (512,),
    },
    "lenet5": {  # conv1 padded by 2 (28x28 centred in 32x32), conv2 VALID.
        "conv1": (28, 28, 6), "pool1": (14, 14, 6), "conv2": (10, 10, 16),
        "pool2": (5, 5, 16), "fc1": (120,), "features": (84,),
    },
    "convnet3": {
        "block1": (14, 14, 64), "block2": (7, 7, 64), "block3": (3, 3, 64),
        "features": (3 * 3 * 64,),
    },
    "convnet4": {
        "block1": (14, 14, 64), "block2": (7, 7, 64), "block3": (3, 3, 64),
        "block4": (1, 1, 64), "features": (64,),
    },
    "resnet18": {  # width 0.25, CIFAR stem.
        "stem": (28, 28, 16), "layer1_0": (28, 28, 16), "layer1_1": (28, 28, 16),
        "layer2_0": (14, 14, 32), "layer2_1": (14, 14, 32), "layer3_0": (7, 7, 64),
        "layer3_1": (7, 7, 64), "layer4_0": (4, 4, 128), "layer4_1": (4, 4, 128),
        "features": (128,),
    },
}

# Width-1 ResNet-18, CIFAR stem, 32x32x3.
EXPECTED_RESNET18_32 = {
    "stem": (32, 32, 64), "layer1_0": (32, 32, 64), "layer1_1": (32, 32, 64),
    "layer2_0": (16, 16, 128), "layer2_1": (16, 16, 128), "layer3_0": (8, 8, 256),
    "layer3_1": (8, 8, 256), "layer4_0": (4, 4, 512), "layer4_1": (4, 4, 512),
    "features": (512,),
}


def abstract_model(name: str, input_shape, **options):
  """The model with ShapeDtypeStruct parameters: shape logic without compute."""
  return nnx.eval_shape(
      lambda: create_model(
          name, num_classes=K, input_shape=input_shape, rngs=nnx.Rngs(0), **options
      )
  )


def forward_shapes(model, input_shape, batch: int = B):
  """``jax.eval_shape`` of the forward pass of a (possibly abstract) model.

  Returns ``(logits, taps, tap_order)``: ``eval_shape`` hands dicts back with
  sorted keys, so the order the model wrote its taps in is recorded while tracing.
  """
  graphdef, params = nnx.split(model, nnx.Param)
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  order = []

  def forward(p, x):
    logits, taps = nnx.merge(graphdef, p)(x)
    order.extend(taps)
    return logits, taps

  logits, taps = jax.eval_shape(forward, params, x)
  return logits, taps, tuple(order)


def model_graphdef(name: str, input_shape, *, conv_impl: str = "auto", **options):
  """The model's GraphDef (for ``nnx.merge``), built without computing anything."""
  abstract = nnx.eval_shape(lambda: create_model(
      name, num_classes=K, input_shape=input_shape, rngs=nnx.Rngs(0), conv_impl=conv_impl,
      **options,
  ))
  return nnx.split(abstract, nnx.Param)[0]


@functools.cache
def _init_params(name: str, input_shape, seed: int, options: tuple):
  # An "rbg" key: XLA compiles threefry's hash once per parameter shape, which
  # made initialisation the slowest part of this file on CPU (~4 s for ResNet).
  rngs = lambda: nnx.Rngs(jax.random.key(seed, impl="rbg"))  # noqa: E731
  make = lambda: create_model(  # noqa: E731
      name, num_classes=K, input_shape=input_shape, rngs=rngs(), **dict(options)
  )
  return jax.jit(lambda: nnx.split(make(), nnx.Param)[1])()


def build(name: str, input_shape, *, seed: int = 0, conv_impl: str = "auto", **options):
  """A concrete model, initialised in one jitted program and cached across tests.

  Eager initialisation compiles a kernel per parameter shape and op (seconds for
  a ResNet on a 2-core CPU); parameters do not depend on ``conv_impl``, so the
  tests comparing lowerings share them.
  """
  params = _init_params(name, tuple(input_shape), seed, tuple(sorted(options.items())))
  graphdef = model_graphdef(name, input_shape, conv_impl=conv_impl, **options)
  return nnx.merge(graphdef, params)


def num_params(model) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def random_batch(input_shape, batch: int = B, seed: int = 0, uniform: bool = False):
  """A fixed random batch (NumPy: nothing to compile). ``uniform``: image-like [0, 1)."""
  rng = np.random.default_rng(seed)
  shape = (batch, *input_shape)
  x = rng.uniform(size=shape) if uniform else rng.normal(size=shape)
  return jnp.asarray(x, jnp.float32), jnp.asarray(rng.integers(0, K, size=batch))


CLASSIFIERS = [n for n in sorted(MODELS) if MODELS[n].task == "classification"]


@pytest.mark.parametrize("input_shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_logits_and_taps(name, input_shape):
  model = abstract_model(name, input_shape, **SMALL.get(name, {}))
  logits, taps, order = forward_shapes(model, input_shape)
  chex.assert_shape(logits, (B, K))
  assert model.task == "classification"
  assert isinstance(model.head, nnx.Linear)
  assert set(taps) == set(model.tap_names)
  assert order == tuple(model.tap_names)  # block order, input side first
  assert model.tap_names[-1] == "features"
  assert taps["features"].ndim == 2 and taps["features"].shape[0] == B
  assert model.head.in_features == taps["features"].shape[1]
  for tap in taps.values():
    assert tap.dtype == jnp.float32 and tap.shape[0] == B
  if input_shape == (28, 28, 1):
    got = {k: v.shape[1:] for k, v in taps.items()}
    assert got == EXPECTED_28[name]


@pytest.mark.parametrize(
    "name,input_shape,dim",
    [("convnet4", (32, 32, 3), 64 * 2 * 2),  # FedBABU's 4convNet classifier input
     ("convnet3", (28, 28, 1), 64 * 3 * 3), ("convnet3", (8, 8, 1), 64),
     ("convnet4", (8, 8, 1), 64), ("lenet5", (32, 32, 3), 84), ("fedavg_cnn", (8, 8, 1), 512)],
)
def test_features_dim(name, input_shape, dim):
  model = abstract_model(name, input_shape)
  _, taps, _ = forward_shapes(model, input_shape)
  chex.assert_shape(taps["features"], (B, dim))
  assert model.head.in_features == dim


def test_fedavg_cnn_shapes_28():
  model = nnx.eval_shape(lambda: FedAvgCNN(K, (28, 28, 1), rngs=nnx.Rngs(0)))
  logits, taps, _ = forward_shapes(model, (28, 28, 1))
  chex.assert_shape(logits, (B, K))
  chex.assert_shape(taps["conv1"], (B, 28, 28, 32))
  chex.assert_shape(taps["pool1"], (B, 14, 14, 32))
  chex.assert_shape(taps["conv2"], (B, 14, 14, 64))
  chex.assert_shape(taps["pool2"], (B, 7, 7, 64))
  chex.assert_shape(taps["features"], (B, 512))


def test_resnet18_shapes_32():
  model = nnx.eval_shape(lambda: ResNet18(K, (32, 32, 3), rngs=nnx.Rngs(0)))
  logits, taps, order = forward_shapes(model, (32, 32, 3))
  chex.assert_shape(logits, (B, K))
  assert order == model.tap_names
  assert {k: v.shape[1:] for k, v in taps.items()} == EXPECTED_RESNET18_32


@pytest.mark.parametrize(
    "input_shape,stem,last",
    [((8, 8, 1), "cifar", (1, 1)), ((8, 8, 1), "imagenet", (1, 1)),
     ((32, 32, 3), "imagenet", (1, 1)), ((28, 28, 1), "imagenet", (1, 1))],
)
def test_resnet18_stems_small_inputs(input_shape, stem, last):
  model = abstract_model("resnet18", input_shape, stem=stem, width_multiplier=0.25)
  logits, taps, _ = forward_shapes(model, input_shape)
  chex.assert_shape(logits, (B, K))
  chex.assert_shape(taps["layer4_1"], (B, *last, 128))
  chex.assert_shape(taps["features"], (B, 128))
  if stem == "imagenet" and input_shape[0] == 32:
    chex.assert_shape(taps["stem"], (B, 8, 8, 16))  # conv 7x7/2 then max-pool 3x3/2


@pytest.mark.parametrize(
    "dilate,output_stride",
    [((False, False, False), 32), ((False, False, True), 16), ((False, True, True), 8)],
)
def test_backbone_output_stride(dilate, output_stride):
  backbone = nnx.eval_shape(
      lambda: ResNetBackbone(
          (64, 64, 3), stem="imagenet", width_multiplier=0.25,
          replace_stride_with_dilation=dilate, rngs=nnx.Rngs(0),
      )
  )
  assert backbone.output_stride == output_stride
  graphdef, params = nnx.split(backbone, nnx.Param)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  last, taps = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
  size = 64 // output_stride
  chex.assert_shape(last, (1, size, size, backbone.out_channels))
  assert set(taps) == set(backbone.tap_names)
  for name, stride in zip(backbone.tap_names, backbone.tap_strides, strict=True):
    assert taps[name].shape[1] == 64 // stride, name
  chex.assert_shape(taps["layer1_1"], (1, 16, 16, 16))  # low-level features, stride 4


def test_backbone_dilation_is_used():
  backbone = nnx.eval_shape(lambda: ResNetBackbone(
      (64, 64, 3), stem="imagenet", width_multiplier=0.25,
      replace_stride_with_dilation=(False, True, True), rngs=nnx.Rngs(0),
  ))
  # First block of a dilated stage: conv1 keeps the previous dilation.
  assert backbone.blocks["layer3_0"].conv1.dilation == (1, 1)
  assert backbone.blocks["layer3_0"].conv2.dilation == (2, 2)
  assert backbone.blocks["layer4_0"].conv1.dilation == (2, 2)
  assert backbone.blocks["layer4_1"].conv2.dilation == (4, 4)
  assert backbone.blocks["layer3_0"].conv1.strides == (1, 1)
  assert backbone.blocks["layer2_0"].conv1.strides == (2, 2)


# One case per model (plus LeNet-5's two padding rules); the SGD test reuses them.
# ResNet: 7x7/2 stem, max-pool 3x3/2 pad 1, strided 3x3 and 1x1 convs, dilations 2 and 4.
RESNET_OPTIONS = {"width_multiplier": 0.25, "stem": "imagenet",
                  "replace_stride_with_dilation": (False, True, True)}
CASES = [
    ("fedavg_cnn", (28, 28, 1), {}),
    ("lenet5", (28, 28, 1), {}),  # conv1 padding 2, conv2 VALID
    ("lenet5", (8, 8, 1), {}),  # conv2 SAME
    ("convnet3", (28, 28, 1), {}),
    ("convnet4", (8, 8, 1), {}),  # last pool skipped at 1x1
    ("resnet18", (32, 32, 3), RESNET_OPTIONS),
]
CASE_IDS = [f"{n}-{s[0]}x{s[1]}x{s[2]}" for n, s, _ in CASES]


@pytest.mark.parametrize("name,input_shape,options", CASES, ids=CASE_IDS)
def test_conv_impls_agree(name, input_shape, options):
  x, _ = random_batch(input_shape)
  outs = {}
  # "matmul" (dense on small maps, else im2col) differs from im2col only at 8×8.
  impls = ("xla", "im2col", "matmul") if input_shape[0] == 8 else ("xla", "im2col")
  for impl in impls:
    graphdef, params = nnx.split(build(name, input_shape, conv_impl=impl, **options), nnx.Param)
    outs[impl] = jax.jit(lambda p, x, g=graphdef: nnx.merge(g, p)(x))(params, x)
  logits_xla, taps_xla = outs["xla"]
  chex.assert_tree_all_finite(logits_xla)
  for impl in impls[1:]:
    logits, taps = outs[impl]
    chex.assert_trees_all_close(logits_xla, logits, atol=1e-4)
    chex.assert_trees_all_close(taps_xla, taps, atol=1e-4, rtol=1e-4)


def test_conv_impls_agree_on_gradients():
  name, input_shape = "lenet5", (8, 8, 1)
  x, y = random_batch(input_shape)
  grads = {}
  for impl in ("xla", "im2col", "matmul"):  # matmul: conv2 (4×4 map) is dense
    graphdef, params = nnx.split(build(name, input_shape, conv_impl=impl), nnx.Param)

    def loss_fn(p, g=graphdef):
      logits, _ = nnx.merge(g, p)(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads[impl] = jax.jit(jax.grad(loss_fn))(params)
  chex.assert_trees_all_close(grads["xla"], grads["im2col"], atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(grads["xla"], grads["matmul"], atol=1e-5, rtol=1e-4)


# The default ResNet-18 (CIFAR stem) for training; the other models as above.
SGD_CASES = [*CASES[:-1], ("resnet18", (32, 32, 3), {"width_multiplier": 0.25})]


@pytest.mark.parametrize(
    "name,input_shape,options", SGD_CASES,
    ids=[f"{n}-{s[0]}x{s[1]}x{s[2]}" for n, s, _ in SGD_CASES],
)
def test_one_sgd_step_lowers_loss(name, input_shape, options):
  # conv_impl="xla" compiles several times faster on CPU; test_conv_impls_agree*
  # cover the im2col lowering.
  model = build(name, input_shape, conv_impl="xla", **options)
  graphdef, params = nnx.split(model, nnx.Param)
  x, y = random_batch(input_shape, batch=4, seed=1, uniform=True)

  def loss_fn(p):
    logits, _ = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  tx = optax.sgd(0.1)
  opt_state = tx.init(params)
  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss0, grads = loss_and_grad(params)
  chex.assert_trees_all_equal_structs(grads, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  loss1, _ = loss_and_grad(new_params)
  assert np.isfinite(loss0) and np.isfinite(loss1)
  assert loss1 < loss0, (float(loss0), float(loss1))
  # Head vs body split by key, as personalisation/perturbation algorithms use it.
  assert "head" in new_params
  assert any(k != "head" for k in new_params)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_are_the_whole_state(name):
  model = abstract_model(name, (8, 8, 1), **SMALL.get(name, {}))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert jax.tree.leaves(rest) == []
  assert jax.tree.leaves(params)
  # A single Param filter is exhaustive (nnx.split raises otherwise).
  nnx.split(model, nnx.Param)
  _, state = nnx.split(model)
  assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(state, is_leaf=lambda v:
                                                              isinstance(v, nnx.Variable)))


def test_fedavg_cnn_parameter_count():
  # conv1 5*5*1*32+32 = 832; conv2 5*5*32*64+64 = 51,264;
  # fc1 7*7*64*512+512 = 1,606,144; head 512*10+10 = 5,130.
  model = abstract_model("fedavg_cnn", (28, 28, 1))
  assert num_params(model) == 832 + 51_264 + 1_606_144 + 5_130 == 1_663_370


def test_lenet5_parameter_counts():
  # 28x28x1 (conv1 padded by 2, conv2 VALID: 5x5x16 = 400 features into fc1):
  # conv1 5*5*1*6+6 = 156; conv2 5*5*6*16+16 = 2,416; fc1 400*120+120 = 48,120;
  # fc2 120*84+84 = 10,164; head 84*10+10 = 850.
  count = num_params(abstract_model("lenet5", (28, 28, 1)))
  assert count == 156 + 2_416 + 48_120 + 10_164 + 850 == 61_706
  # 8x8x1 (conv2 SAME, maps 8 -> 4 -> 2: 2*2*16 = 64 features into fc1):
  # conv1 156; conv2 2,416; fc1 64*120+120 = 7,800; fc2 10,164; head 850.
  count = num_params(abstract_model("lenet5", (8, 8, 1)))
  assert count == 156 + 2_416 + 7_800 + 10_164 + 850 == 21_386


def test_moon_cifar10_network_parameter_count():
  # MOON's CIFAR-10 network (Li et al. 2021 §4.1): LeNet-5 at 32x32x3 (VALID convs),
  # projection head 84 -> 84 -> 256, output layer 256 -> 10.
  # conv1 5*5*3*6+6 = 456; conv2 2,416; fc1 48,120; fc2 10,164;
  # projection fc1 84*84+84 = 7,140, fc2 84*256+256 = 21,760; head 256*10+10 = 2,570.
  model = abstract_model("lenet5", (32, 32, 3), projection_dim=256)
  expected = 456 + 2_416 + 48_120 + 10_164 + 7_140 + 21_760 + 2_570
  assert expected == 92_626
  assert num_params(model) == expected
  projection = nnx.state(model, nnx.Param)["projection"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(projection)) == 7_140 + 21_760
  # Without the head: the output layer takes the 84 features (84*10+10 = 850).
  plain = num_params(abstract_model("lenet5", (32, 32, 3)))
  assert plain == 456 + 2_416 + 48_120 + 10_164 + 850 == 62_006


def test_convnet_parameter_counts():
  # A block: conv 3x3 with bias (3*3*C_in*64+64) and GroupNorm scale+bias (2*64 = 128).
  # convnet4 at 32x32x3 (FedBABU's 4convNet): block1 3*3*3*64+64+128 = 1,920;
  # blocks 2-4 3*3*64*64+64+128 = 37,056 each; head 2*2*64 = 256 features, 256*10+10 = 2,570.
  count = num_params(abstract_model("convnet4", (32, 32, 3)))
  assert count == 1_920 + 3 * 37_056 + 2_570 == 115_658
  # convnet3 at 28x28x1: block1 3*3*1*64+64+128 = 768; blocks 2-3 37,056 each;
  # head 3*3*64 = 576 features, 576*10+10 = 5,770.
  count = num_params(abstract_model("convnet3", (28, 28, 1)))
  assert count == 768 + 2 * 37_056 + 5_770 == 80_650


def test_resnet18_parameter_count():
  # Convs are bias-free; each GroupNorm has a scale and a bias (2 * channels).
  # stem: 3*3*3*64 + GN 128                                   =     1,856
  # layer1: 2 x (2 * 3*3*64*64 + 2 GN 256)                     =   147,968
  # layer2: block0 3*3*64*128 + 3*3*128*128 + 2 GN 512
  #         + shortcut 64*128 + GN 256 = 230,144; block1 295,424 = 525,568
  # layer3: block0 294,912 + 589,824 + 1,024 + 32,768 + 512 = 919,040;
  #         block1 2 * 589,824 + 1,024 = 1,180,672              = 2,099,712
  # layer4: block0 1,179,648 + 2,359,296 + 2,048 + 131,072 + 1,024 = 3,673,088;
  #         block1 2 * 2,359,296 + 2,048 = 4,720,640            = 8,393,728
  # head: 512*10 + 10                                          =     5,130
  model = nnx.eval_shape(lambda: ResNet18(K, (32, 32, 3), rngs=nnx.Rngs(0)))
  expected = 1_856 + 147_968 + 525_568 + 2_099_712 + 8_393_728 + 5_130
  assert expected == 11_173_962
  assert num_params(model) == expected
  head = nnx.state(model, nnx.Param)["head"]
  assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(head)) == 5_130


def test_zero_init_residual():
  block = BasicBlock(8, 8, zero_init_residual=True, conv_impl="xla",
                     rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  assert not np.any(block.norm2.scale[...])
  assert np.all(block.norm1.scale[...] == 1)
  assert block.shortcut_conv is None
  x, _ = random_batch((4, 4, 8), batch=1)
  chex.assert_trees_all_close(block(x), jax.nn.relu(x))  # starts as its shortcut
  model = abstract_model("resnet18", (8, 8, 1), width_multiplier=0.25, zero_init_residual=True)
  assert model.backbone.blocks["layer4_1"].norm2.scale.shape == (128,)


def test_options_reach_the_model():
  model = abstract_model("convnet4", (32, 32, 3), width=8)
  _, taps, _ = forward_shapes(model, (32, 32, 3))
  chex.assert_shape(taps["block4"], (B, 2, 2, 8))
  chex.assert_shape(taps["features"], (B, 32))
  assert "width" in model_options("convnet3")
  assert set(model_options("resnet18")) >= {"stem", "width_multiplier"}


@pytest.mark.parametrize("name,options", [
    ("lenet5", {}), ("fedavg_cnn", {"hidden_units": 32}), ("convnet3", {"width": 8}),
    ("resnet18", {"width_multiplier": 0.25}),
])
def test_projection_head_by_hand(name, options):
  # MOON's network: features h -> z = relu(h W1 + b1) W2 + b2 -> logits = z W + b.
  input_shape, dim = (8, 8, 1), 6
  plain = build(name, input_shape, conv_impl="xla", **options)
  model = build(name, input_shape, conv_impl="xla", projection_dim=dim, **options)
  assert model.tap_names == (*plain.tap_names, "projection")  # the head's input is last
  x, _ = random_batch(input_shape, seed=3)

  def run(m):
    graphdef, params = nnx.split(m, nnx.Param)
    return jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)

  logits, taps = run(model)
  p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  f64 = lambda a: np.asarray(a, np.float64)
  dense = lambda a, layer: a @ f64(layer["kernel"]) + f64(layer["bias"])
  z = dense(np.maximum(dense(f64(taps["features"]), p["projection"]["fc1"]), 0.0),
            p["projection"]["fc2"])
  chex.assert_shape(taps["projection"], (B, dim))
  np.testing.assert_allclose(taps["projection"], z, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, dense(z, p["head"]), rtol=1e-4, atol=1e-5)
  assert model.head.in_features == dim
  # The encoder is built first from the same key stream: same parameters, same taps.
  _, plain_taps = run(plain)
  chex.assert_trees_all_close(plain_taps, {k: v for k, v in taps.items() if k != "projection"},
                              atol=1e-6)


@pytest.mark.parametrize("value", [-1, 2.5, True])
def test_bad_projection_dim(value):
  with pytest.raises(ConfigError, match="model.projection_dim") as err:
    create_model("lenet5", num_classes=K, input_shape=(8, 8, 1), rngs=nnx.Rngs(0),
                 projection_dim=value)
  assert "\n" not in str(err.value)


def test_unknown_model_name():
  with pytest.raises(ConfigError) as err:
    create_model("vgg", num_classes=K, input_shape=(28, 28, 1), rngs=nnx.Rngs(0))
  msg = str(err.value)
  assert "\n" not in msg and "model.name='vgg'" in msg
  for name in ("convnet3", "convnet4", "fedavg_cnn", "lenet5", "resnet18"):
    assert name in msg


def test_unknown_option():
  with pytest.raises(ConfigError) as err:
    create_model("lenet5", num_classes=K, input_shape=(28, 28, 1), rngs=nnx.Rngs(0),
                 width=3)
  assert "width" in str(err.value) and "lenet5" in str(err.value)
  with pytest.raises(ConfigError) as err:
    create_model("resnet18", num_classes=K, input_shape=(32, 32, 3), rngs=nnx.Rngs(0),
                 depth=50)
  msg = str(err.value)
  assert "depth" in msg and "width_multiplier" in msg and "stem" in msg


@pytest.mark.parametrize(
    "kwargs,setting",
    [({"stem": "vit"}, "model.stem"),
     ({"replace_stride_with_dilation": (True,)}, "model.replace_stride_with_dilation"),
     ({"conv_impl": "cudnn"}, "model.conv_impl")],
)
def test_bad_option_values(kwargs, setting):
  with pytest.raises(ConfigError, match=setting):
    create_model("resnet18", num_classes=K, input_shape=(8, 8, 1), rngs=nnx.Rngs(0),
                 **kwargs)
