"""Dense products whose kernel gradient suits XLA:CPU: :func:`matmul` and :func:`linear`.

Dense layers and im2col / banded patches (:mod:`isr_jax.nn.conv`) are multiplied
by :func:`matmul`, whose kernel gradient on CPU is the transposed-operand product
autodiff writes only for long contractions (a convolution's patches); shorter
ones, slow in that form under ``vmap``, are plain products of a transposed copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

# :func:`matmul`'s kernel gradient contracts the ``M`` rows of its operands. From this
# many rows on (a convolution's patches: LeNet-5's conv1 / conv2 at 28×28, batch 32–64,
# 6,272–12,544 / 960–1,920 rows) it is the plain transposed-operand product, which
# XLA:CPU runs faster than a transpose and a product (the transpose of a 12,544-row
# gradient fused with the max-pool backward took 0.6 ms, as long as the product): a
# 28×28 LeNet-5 training step 1.17–1.19× faster, 1.07× with 4 clients vmapped. Short
# contractions keep the transposed forms: batched small matrices (LeNet-5 on 8×8 digits,
# 20 clients vmapped, ≤ 256 rows) ran 0.90× with the plain product.
PLAIN_KERNEL_GRADIENT_MIN_ROWS = 512


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x [..., K] @ kernel [K, O]`` (a dense layer, or im2col patches) whose kernel
  gradient is a plain matmul.

  Autodiff writes the kernel gradient as ``xᵀ @ dy``, contracting ``x``'s
  leading axes: a transposed-operand dot that XLA:CPU's YNNPACK does not take.
  Eigen runs it faster than any rewrite when the contraction is long (at least
  :data:`PLAIN_KERNEL_GRADIENT_MIN_ROWS` rows: a convolution's patches), so those
  keep it, but at 7–29 GFLOP/s on the short ones of batched small matrices
  (LeNet-5 on 8×8 digits under ``vmap``). On CPU a short one is an ordinary
  product with one operand transposed first, whichever moves
  less memory: ``(xᵀ) @ dy`` when ``x`` is smaller than ``dy`` and the gradient
  together (a dense layer: transposing the [M, K] activations, not the [K, O]
  gradient, which the optimizer would otherwise read transposed — 1.5 ms of a
  FedAvg-CNN step), else ``((dyᵀ) @ x)ᵀ`` (im2col patches: 1.7× faster at LeNet-5's
  conv2 shapes). Optimization barriers keep XLA's simplifier from folding the
  transposes back into the slow form.
  Same values and gradients as ``x @ kernel``.
  """
  return jnp.einsum("...k,ko->...o", x, kernel)


def _matmul_fwd(x, kernel):
  return matmul(x, kernel), (x, kernel)


def _matmul_bwd(residuals, dy):
  x, kernel = residuals
  dx = jnp.einsum("...o,ko->...k", dy, kernel)
  x, dy = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  (m, k), o = x.shape, dy.shape[1]
  if jax.default_backend() != "cpu" or m >= PLAIN_KERNEL_GRADIENT_MIN_ROWS:
    return dx, x.T @ dy
  if m * k <= (m + k) * o:  # transposing x moves no more than dy and the gradient
    return dx, lax.optimization_barrier(x.T) @ dy
  dy_t = lax.optimization_barrier(dy.T)
  return dx, lax.optimization_barrier(dy_t @ x).T


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, **kwargs):
  plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2
  if plain and precision is None and all(v is None for v in kwargs.values()):
    return matmul(lhs, rhs)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
  """``nnx.Linear`` (same parameters and initialisation) computed with :func:`matmul`."""
  return nnx.Linear(in_features, out_features, dot_general=_dense_dot_general, rngs=rngs,
                    **kwargs)
