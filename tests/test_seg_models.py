"""Tests for the segmentation models (DeepLabv3+, TopFormer, SeaFormer) with taps.

Compilation dominates on a CPU, so each model is initialised and trained by
one cached jitted step (:func:`trained`); the published variants are only
traced (``jax.eval_shape``), never run.
"""

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
from isr_jax.losses import cross_entropy
from isr_jax.models import MODELS, create_model, model_options
from isr_jax.models.seg_layers import adaptive_avg_pool, resize
from isr_jax.nn.conv import Conv

B, K = 2, 5
SHAPE = (64, 64, 3)
SEG_MODELS = ("deeplabv3plus", "topformer", "seaformer")
IGNORE = 255

# Tap shapes (no batch axis) of the default (CPU-sized) models at 64x64x3.
EXPECTED_64 = {
    "deeplabv3plus": {  # width 0.25: stages 16/32/64/128, ASPP 64; output stride 16.
        "stem": (16, 16, 16), "layer1_1": (16, 16, 16), "layer2_1": (8, 8, 32),
        "layer3_1": (4, 4, 64), "layer4_1": (4, 4, 128),  # stage 4 dilated, not strided
        "aspp": (4, 4, 64), "decoder": (16, 16, 64),  # stride 16 / stride 4
    },
    "topformer": {  # mini: pyramid 16/24/32/48, semantics 16+24+32+48 = 120 on 1/64.
        "stem": (32, 32, 16), "tokens_s4": (16, 16, 16), "tokens_s8": (8, 8, 24),
        "tokens_s16": (4, 4, 32), "tokens_s32": (2, 2, 48), "semantics": (1, 1, 120),
        "inject_s8": (8, 8, 64), "inject_s16": (4, 4, 64), "inject_s32": (2, 2, 64),
        "decoder": (8, 8, 64),
    },
    "seaformer": {  # mini: stages 16/24/32/48/64, fusion 32 channels at stride 8.
        "stem_s4": (16, 16, 16), "stem_s8": (8, 8, 24), "context_s16": (4, 4, 32),
        "context_s32": (2, 2, 48), "sea_s32_0": (2, 2, 48), "context_s64": (1, 1, 64),
        "sea_s64_0": (1, 1, 64), "fuse1": (8, 8, 32), "fuse2": (8, 8, 32),
        "decoder": (8, 8, 32),
    },
}

# Published configurations: (options, num_classes, input, reference parameter count).
PUBLISHED = {
    # No paper reports DeepLabv3+ on ResNet-18; the reference is the architecture's
    # own count with BatchNorm: torchvision's ResNet-18 without fc (11,176,512)
    # + ASPP: 1x1, three 3x3, pooling 1x1 and 1280->256 projection, each with
    # a norm (131,584 + 3 * 1,180,160 + 131,584 + 328,192 = 4,131,840)
    # + decoder: 64->48 1x1, 304->256 and 256->256 3x3 (3,168 + 700,928 +
    # 590,336 = 1,294,432) + classifier for 19 Cityscapes classes (4,883)
    # = 16,607,667 (GroupNorm has as many parameters as BatchNorm).
    "deeplabv3plus": [(dict(width_multiplier=1.0), 19, (512, 1024, 3), 16_607_667)],
    # hustvl/TopFormer README (ADE20K, 150 classes): T 1.4 M, S 3.1 M, B 5.1 M.
    "topformer": [(dict(variant="tiny"), 150, (512, 512, 3), 1.4e6),
                  (dict(variant="small"), 150, (512, 512, 3), 3.1e6),
                  (dict(variant="base"), 150, (512, 512, 3), 5.1e6)],
    # fudan-zvg/SeaFormer seaformer-seg README (ADE20K, 150 classes):
    # T 1.7 M, S 4.0 M, B 8.6 M, L 14.0 M.
    "seaformer": [(dict(variant="tiny"), 150, (512, 512, 3), 1.7e6),
                  (dict(variant="small"), 150, (512, 512, 3), 4.0e6),
                  (dict(variant="base"), 150, (512, 512, 3), 8.6e6),
                  (dict(variant="large"), 150, (512, 512, 3), 14.0e6)],
}


def num_params(model) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def make(name, *, conv_impl="auto", **options):
  return create_model(name, num_classes=K, input_shape=SHAPE, rngs=nnx.Rngs(0),
                      conv_impl=conv_impl, **options)


def batch():
  """Fixed images and labels with an ignored (255) band."""
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(B, *SHAPE)).astype(np.float32)
  y = rng.integers(0, K, size=(B, *SHAPE[:2]))
  y[:, :8, :] = IGNORE
  return jnp.asarray(x), jnp.asarray(y)


def graphdef_of(name, conv_impl):
  return nnx.split(nnx.eval_shape(lambda: make(name, conv_impl=conv_impl)), nnx.Param)[0]


@functools.cache
def trained(name):
  """Initial params, the first step's logits/taps/tap order and 4 Adam losses.

  Compilation dominates on a CPU, so each model is initialised in one jitted
  program ("rbg" key: eager init compiles a kernel per parameter shape) and
  one jitted training step also returns the forward pass at its input
  parameters. The step uses the ``"xla"`` lowering, which compiles fastest;
  :func:`test_conv_impls_agree` checks ``"im2col"`` against it.
  """
  def init():
    rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
    model = create_model(name, num_classes=K, input_shape=SHAPE, rngs=rngs,
                         conv_impl="xla")
    return nnx.split(model, nnx.Param)[1]

  graphdef = graphdef_of(name, "xla")
  params0 = jax.jit(init)()
  x, y = batch()
  order = []

  def loss_fn(p):
    logits, taps = nnx.merge(graphdef, p)(x)
    order.extend(taps)  # while tracing: the order the model wrote its taps in
    return cross_entropy(logits, y, ignore_index=IGNORE), (logits, taps)

  tx = optax.adam(1e-3)

  @jax.jit
  def step(p, s):
    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss, out

  params, opt_state, losses, first = params0, tx.init(params0), [], None
  for _ in range(4):
    params, opt_state, loss, out = step(params, opt_state)
    losses.append(float(loss))
    first = out if first is None else first
  return dict(graphdef=graphdef, params=params0, logits=first[0], taps=first[1],
              order=tuple(order), losses=losses)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_logits_and_taps(name):
  run = trained(name)
  model = nnx.merge(run["graphdef"], run["params"])
  logits, taps = run["logits"], run["taps"]
  assert run["order"] == tuple(model.tap_names)  # block order, input side first
  assert model.task == "segmentation"
  assert isinstance(model.head, Conv)
  assert model.tap_names[-1] == "decoder"
  chex.assert_shape(logits, (B, *SHAPE[:2], K))
  assert set(taps) == set(model.tap_names)
  for tap in taps.values():
    assert tap.ndim == 4 and tap.shape[0] == B and tap.dtype == jnp.float32
  for tap, shape in EXPECTED_64[name].items():
    assert taps[tap].shape[1:] == shape, tap
  assert np.isfinite(np.asarray(logits)).all()
  # The head is the 1x1 classifier on the "decoder" tap; the rest is the body.
  assert model.head.kernel.shape == (1, 1, taps["decoder"].shape[-1], K)
  assert "head" in run["params"] and len(run["params"]) > 1


@pytest.mark.parametrize("name", SEG_MODELS)
def test_training_steps_lower_the_loss(name):
  # Adam 1e-3 on per-pixel cross-entropy with an ignored band, fixed batch.
  losses = trained(name)["losses"]
  assert np.isfinite(losses).all()
  assert losses[-1] < losses[0], losses


def test_conv_impls_agree():
  # DeepLabv3+ has strided, dilated (atrous) 3x3, 7x7 and 1x1 convs.
  run = trained("deeplabv3plus")
  graphdef = graphdef_of("deeplabv3plus", "im2col")
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])(run["params"], batch()[0])
  np.testing.assert_allclose(logits, run["logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name,options,num_classes,shape,reference",
    [(name, *row) for name, rows in PUBLISHED.items() for row in rows],
    ids=lambda v: v.get("variant", "resnet18") if isinstance(v, dict) else None,
)
def test_published_variants(name, options, num_classes, shape, reference):
  model = nnx.eval_shape(lambda: create_model(
      name, num_classes=num_classes, input_shape=shape, rngs=nnx.Rngs(0), **options))
  count = num_params(model)
  # GroupNorm/LayerNorm have as many parameters as BatchNorm; allow 15 %.
  assert abs(count - reference) <= 0.15 * reference, (count, reference)
  if options.get("variant", "tiny") == "tiny":  # trace one forward per family
    graphdef, params = nnx.split(model, nnx.Param)
    logits, taps = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params,
                                  jax.ShapeDtypeStruct((1, *shape), jnp.float32))
    chex.assert_shape(logits, (1, *shape[:2], num_classes))
    assert set(taps) == set(model.tap_names)


@pytest.mark.parametrize("name", SEG_MODELS)
def test_odd_input_size_and_client_vmap(name):
  # Sizes that no stride divides (adaptive pooling takes its general path), and
  # the forward vmapped over a leading client axis of params and data, as an
  # FL round runs it. Shapes only.
  shape = (70, 45, 3)
  model = nnx.eval_shape(lambda: create_model(name, num_classes=K, input_shape=shape,
                                              rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  clients = jax.tree.map(lambda p: jax.ShapeDtypeStruct((3, *p.shape), p.dtype), params)
  x = jax.ShapeDtypeStruct((3, B, *shape), jnp.float32)
  logits, taps = jax.eval_shape(jax.vmap(lambda p, x: nnx.merge(graphdef, p)(x)), clients, x)
  chex.assert_shape(logits, (3, B, 70, 45, K))
  assert set(taps) == set(model.tap_names)


def test_deeplab_output_stride_8():
  model = nnx.eval_shape(lambda: make("deeplabv3plus", output_stride=8))
  graphdef, params = nnx.split(model, nnx.Param)
  logits, taps = jax.eval_shape(lambda p, x: nnx.merge(graphdef, p)(x), params,
                                jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))
  chex.assert_shape(logits, (1, 64, 64, K))
  assert taps["aspp"].shape[1:3] == (8, 8)
  assert taps["layer3_1"].shape[1:3] == (8, 8)  # stage 3 dilated too
  assert model.aspp.rates == (12, 24, 36)


@pytest.mark.parametrize(
    "name,options,option",
    [("deeplabv3plus", dict(output_stride=7), "output_stride"),
     ("deeplabv3plus", dict(atrous_rates=(0, 2)), "atrous_rates"),
     ("topformer", dict(variant="huge"), "variant"),
     ("seaformer", dict(depth=0), "depth")],
)
def test_bad_options(name, options, option):
  with pytest.raises(ConfigError, match=f"model.{option}="):
    nnx.eval_shape(lambda: make(name, **options))


def test_registry():
  assert set(SEG_MODELS) <= set(MODELS)
  assert set(model_options("deeplabv3plus")) == {
      "atrous_rates", "output_stride", "width_multiplier"}
  assert set(model_options("topformer")) == {"depth", "variant", "width_multiplier"}
  assert set(model_options("seaformer")) == {"depth", "variant", "width_multiplier"}


def test_adaptive_avg_pool_matches_bins():
  x = jnp.arange(2 * 7 * 5 * 3, dtype=jnp.float32).reshape(2, 7, 5, 3)
  got = adaptive_avg_pool(x, (3, 2))
  # PyTorch bins: rows [0,3) [2,5) [4,7); columns [0,3) [2,5).
  rows, cols = [(0, 3), (2, 5), (4, 7)], [(0, 3), (2, 5)]
  want = np.stack([np.stack([np.asarray(x)[:, r0:r1, c0:c1].mean(axis=(1, 2))
                             for c0, c1 in cols], axis=1) for r0, r1 in rows], axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(adaptive_avg_pool(x[:, :6, :4], (3, 2)),
                             np.asarray(x)[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).mean((2, 4)),
                             rtol=1e-6)


def test_resize_upsamples_like_pytorch_bilinear():
  # align_corners=False: output pixel i samples input position (i + 0.5) / 2 - 0.5.
  x = jnp.asarray([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 4, 1)
  got = resize(x, (1, 8))[0, 0, :, 0]
  np.testing.assert_allclose(got, [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0], atol=1e-6)
