"""isr_jax.nn: convolution lowerings (canonical-backward, banded, dense) and the ``auto``
policy; matmul and linear; max-pool gradients; CPU compiler options."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from isr_jax.nn import lowering
from isr_jax.nn.compiler import xla_compiler_options
from isr_jax.nn.conv import (
    Conv,
    conv2d_banded,
    conv2d_canonical,
    conv2d_dense,
    conv_padding,
)
from isr_jax.nn.dense import linear, matmul
from isr_jax.nn.lowering import resolve_conv_impl
from isr_jax.nn.pooling import max_pool


def _window_fits(size, k, stride, dilation, padding):
  return size + 2 * (padding == 1) >= (k - 1) * dilation + 1


GRID = ([1, 3, 5], [1, 2, 3], [1, 2], ["SAME", "VALID", 1])  # kernel, stride, dilation, pad
# Every kernel, stride, dilation and padding whose window fits: on 7–8 pixel maps for
# the canonical-backward and banded convs (widths 8–9: the banded conv's last block of
# columns overhangs and is cropped), on 3–5 pixel maps (where "auto" uses it) for the
# dense one.
CASES = [(low, *c) for low in ("canonical", "banded")
         for c in itertools.product([7, 8], *GRID) if _window_fits(*c)]
CASES += [("dense", *c) for c in itertools.product([3, 4, 5], *GRID) if _window_fits(*c)]
LOWERINGS = {"canonical": conv2d_canonical, "banded": conv2d_banded, "dense": conv2d_dense}


@pytest.mark.parametrize("lowering,size,k,stride,dilation,padding", CASES)
def test_lowering_has_laxs_values_and_gradients(lowering, size, k, stride, dilation, padding):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size + 1, 3))
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 3, 4))
  pad = tuple(conv_padding(x.shape[1:3], (k, k), (stride,) * 2, (dilation,) * 2, padding))
  ref = lambda x, w: lax.conv_general_dilated(
      x, w, (stride,) * 2, pad, rhs_dilation=(dilation,) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  new = lambda x, w: LOWERINGS[lowering](x, w, (stride,) * 2, pad, (dilation,) * 2)
  # One program per case: eagerly, each of the ~300 cases compiled every primitive
  # of the lowering and its transpose on its own shapes.
  both = jax.jit(lambda x, w: ((new(x, w), *_grads(new, x, w)), (ref(x, w), *_grads(ref, x, w))))
  (y, *grads), (y_ref, *grads_ref) = both(x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(grads, grads_ref, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "xla_cpu", "im2col", "banded", "dense", "matmul", "auto"])
def test_every_lowering_of_the_layer_agrees(impl):
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 9, 9, 4))
  ref = Conv(4, 6, 3, strides=2, dilation=1, rngs=nnx.Rngs(0), impl="xla")
  conv = Conv(4, 6, 3, strides=2, dilation=1, rngs=nnx.Rngs(0), impl=impl)
  np.testing.assert_allclose(conv(x), ref(x), atol=1e-5)
  grouped = Conv(4, 8, 3, groups=4, rngs=nnx.Rngs(0), impl=impl)  # xla_cpu etc. -> im2col
  grouped_ref = Conv(4, 8, 3, groups=4, rngs=nnx.Rngs(0), impl="xla")
  np.testing.assert_allclose(grouped(x), grouped_ref(x), atol=1e-5)


def test_auto_policy_on_cpu():
  assert jax.default_backend() == "cpu"
  assert resolve_conv_impl("auto", "vmap") == "matmul"
  assert resolve_conv_impl("auto", "chunked") == "matmul"
  assert resolve_conv_impl("auto", "sequential") == "auto"  # decided per layer
  assert resolve_conv_impl("xla", "vmap") == "xla"
  assert lowering._auto_impl(lowering.IM2COL_MAX_PATCH_ELEMENTS) == "im2col"
  assert lowering._auto_impl(lowering.IM2COL_MAX_PATCH_ELEMENTS + 1) == "xla_cpu"
  assert lowering._auto_impl(lowering.IM2COL_MAX_PATCH_ELEMENTS + 1, dense_applies=True) == "dense"
  assert lowering._auto_impl(lowering.IM2COL_MAX_PATCH_ELEMENTS + 1,
                             banded_applies=True) == "banded"
  # Narrow inputs (1–6 channels, stride 1) are banded; strided, dilated, grouped
  # and wider-input convolutions are not.
  assert lowering._banded_applies((5, 5, 1, 32), (1, 1), (1, 1), groups=1)
  assert lowering._banded_applies((3, 3, 3, 64), (1, 1), (1, 1), groups=1)
  assert lowering._banded_applies((5, 5, 6, 16), (1, 1), (1, 1), groups=1)  # LeNet-5's conv2
  assert not lowering._banded_applies((3, 3, 8, 8), (1, 1), (1, 1), groups=1)
  assert not lowering._banded_applies((5, 5, 32, 64), (1, 1), (1, 1), groups=1)
  assert not lowering._banded_applies((7, 7, 3, 64), (2, 2), (1, 1), groups=1)
  assert not lowering._banded_applies((3, 3, 3, 8), (1, 1), (2, 2), groups=1)
  assert not lowering._banded_applies((3, 3, 1, 3), (1, 1), (1, 1), groups=3)
  # LeNet-5's conv2 on 8×8 digits (a 4×4 map, 5×5 kernel, 6 -> 16 channels) is dense;
  # its conv1 (8×8 map), grouped convolutions and oversized matrices are not.
  assert lowering._dense_applies((4, 4), (5, 5, 6, 16), (4, 4), groups=1)
  assert not lowering._dense_applies((8, 8), (5, 5, 1, 6), (8, 8), groups=1)
  assert not lowering._dense_applies((3, 3), (3, 3, 1, 8), (3, 3), groups=8)
  assert not lowering._dense_applies((3, 3), (3, 3, 512, 512), (3, 3), groups=1)
  with pytest.raises(ValueError, match=r"model\.conv_impl='fast' is not one of"):
    resolve_conv_impl("fast")


def _grads(f, *args):
  return jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), range(len(args)))(*args)


# (5, 7): x is transposed for the kernel gradient; (2, 3, 4, 7): dy and the gradient are.
@pytest.mark.parametrize("x_shape", [(5, 7), (2, 3, 4, 7)])
def test_matmul_has_the_products_gradients_alone_and_vmapped(x_shape):
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  w = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
  np.testing.assert_allclose(matmul(x, w), x @ w, rtol=1e-6)
  for a, b in zip(_grads(matmul, x, w), _grads(jnp.matmul, x, w), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Under vmap (clients), as in a round: one kernel per client.
  xs, ws = jnp.stack([x, -2 * x]), jnp.stack([w, w + 1])
  per_client = lambda f: jax.vmap(lambda x, w: _grads(f, x, w))
  for a, b in zip(per_client(matmul)(xs, ws), per_client(jnp.matmul)(xs, ws),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_linear_is_nnx_linear_with_the_same_parameters():
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 6))
  ours, ref = linear(6, 5, rngs=nnx.Rngs(3)), nnx.Linear(6, 5, rngs=nnx.Rngs(3))
  chex.assert_trees_all_equal(nnx.state(ours, nnx.Param), nnx.state(ref, nnx.Param))
  np.testing.assert_allclose(ours(x), ref(x), rtol=1e-6)


@pytest.mark.parametrize("impl", ["im2col", "xla_cpu", "banded", "dense", "matmul", "auto"])
@pytest.mark.parametrize("size", [3, 8])  # "matmul" and "auto": dense at 3×3, banded at 8×8
def test_every_lowering_has_laxs_gradients_under_vmap(impl, size):
  x = jax.random.normal(jax.random.PRNGKey(4), (2, 3, size, size, 2))  # [clients, B, H, W, C]
  def grads(impl):
    conv = Conv(2, 4, 3, strides=1, rngs=nnx.Rngs(0), impl=impl)
    graphdef, params = nnx.split(conv)
    loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    return jax.vmap(jax.grad(loss, (0, 1)))(stacked, x)
  chex.assert_trees_all_close(grads(impl), grads("xla"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stored_input", [False, True])
@pytest.mark.parametrize("window", [2, 3])
def test_max_pool_gradient_shares_ties_like_jax(window, stored_input):
  relu_ints = jnp.maximum(jax.random.randint(jax.random.PRNGKey(5), (2, 7, 9, 3), -2, 3), 0)
  x = relu_ints.astype(jnp.float32)  # many tied maxima, as after a ReLU
  oh, ow = 7 // window, 9 // window
  ref = lambda x: x[:, : oh * window, : ow * window].reshape(
      2, oh, window, ow, window, 3).max(axis=(2, 4))
  pool = lambda x: max_pool(x, window, stored_input=stored_input)
  np.testing.assert_array_equal(pool(x), ref(x))
  for a, b in zip(_grads(pool, x), _grads(ref, x), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Compiled, on a convolution's output (what stored_input is for), with ties.
  w = jnp.zeros((3, 3, 3, 3)).at[1, 1].set(jnp.eye(3))  # the identity: x itself
  conv_pool = jax.jit(lambda pool, x: pool(conv2d_banded(x, w, (1, 1), ((1, 1), (1, 1)),
                                                         (1, 1))), static_argnums=0)
  np.testing.assert_array_equal(conv_pool(pool, x), ref(x))
  grad = jax.jit(jax.grad(lambda x, pool: jnp.sum(jnp.sin(conv_pool(pool, x))),
                          argnums=0), static_argnums=1)
  np.testing.assert_allclose(grad(x, pool), grad(x, ref), rtol=1e-6, atol=1e-7)


def test_cpu_rounds_compile_convolutions_for_eigen():
  options = xla_compiler_options()
  assert options == {"xla_cpu_experimental_ynn_fusion_type":
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  x, w = jnp.ones((8, 14, 14, 32)), jnp.ones((5, 5, 32, 64))  # the FedAvg CNN's conv2
  conv = lambda x, w: conv2d_canonical(x, w, (1, 1), ((2, 2), (2, 2)), (1, 1))
  default = jax.jit(conv).lower(x, w).compile().as_text()
  ours = jax.jit(conv, compiler_options=options).lower(x, w).compile().as_text()
  assert "__ynn_fusion" in default  # XLA's default: YNNPACK runs the convolution
  assert "__ynn_fusion" not in ours and "convolution(" in ours
  np.testing.assert_allclose(jax.jit(conv, compiler_options=options)(x, w), conv(x, w))
