"""Pools over the spatial axes of NHWC maps: max, average and global average.

Max-pooling is written as elementwise maxima of strided views (or, for a
stored convolution output, ``reshape`` + ``max``), with a hand-written
elementwise backward, because the backward pass of ``reduce_window``
(select-and-scatter) is slow on XLA CPU and that of a ``reshape`` + ``max``
counts ties with a slow reduction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: int = 2, stride: int | None = None, padding: int = 0,
             *, stored_input: bool = False):
  """Max-pool over H, W of an NHWC tensor (floor mode, like PyTorch).

  ``window == stride`` without padding uses reshape + max; other shapes take the
  max over shifted strided slices. Neither uses ``reduce_window``.

  ``stored_input`` says that ``x`` is the stored result of a library call (a
  convolution's output, no elementwise op after it), which XLA never recomputes:
  the backward pass of a tiled pool then compares ``x`` with the stored maxima
  instead of recomputing them (:func:`_tiled_max_of_stored`).
  """
  stride = window if stride is None else stride
  if padding:
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                constant_values=-jnp.inf)
  b, h, w, c = x.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  if oh < 1 or ow < 1:
    raise ValueError(f"max_pool window {window} does not fit a {h}x{w} feature map")
  if window == stride:
    tiled = _tiled_max_of_stored if stored_input and not padding else _tiled_max
    return tiled(x[:, : oh * window, : ow * window, :], window)
  out = None
  for i in range(window):
    for j in range(window):
      s = x[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
      out = s if out is None else jnp.maximum(out, s)
  return out


def _window_views(x: jax.Array, window: int) -> tuple[jax.Array, list[jax.Array]]:
  """``x`` as [B, H/k, k, W/k, k, C] and its k² strided [B, H/k, W/k, C] views."""
  b, h, w, c = x.shape
  tiles = x.reshape(b, h // window, window, w // window, window, c)
  return tiles, [tiles[:, :, i, :, j, :] for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max(x: jax.Array, window: int) -> jax.Array:
  """Max over non-overlapping k×k tiles of an NHWC map whose sides k divides.

  Same values and gradients as ``reshape(...).max(axis=(2, 4))`` (ties share the
  gradient equally), but written as elementwise ops only: autodiff of the
  reduction counts ties with a second reduction, which XLA:CPU hands to YNNPACK
  and which took 28 % of a FedAvg-CNN training step (a profile of the round).
  """
  return functools.reduce(jnp.maximum, _window_views(x, window)[1])


def _tiled_max_fwd(x, window):
  y = _tiled_max(x, window)
  return y, (x, y)


def _tiled_max_bwd(window, residuals, dy):
  """``dx``: each window's ``dy`` shared equally among its elements equal to ``y``."""
  x, y = residuals
  tiles, views = _window_views(x, window)
  ties = functools.reduce(jnp.add, [(v == y).astype(dy.dtype) for v in views])
  share = (dy / ties)[:, :, None, :, None, :]
  dx = jnp.where(tiles == y[:, :, None, :, None, :], share, 0)
  return (dx.reshape(x.shape),)


_tiled_max.defvjp(_tiled_max_fwd, _tiled_max_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _tiled_max_of_stored(x: jax.Array, window: int) -> jax.Array:
  """:func:`_tiled_max` of a map that XLA reads from memory, never recomputes.

  Same values and gradients. The forward pass is the reduction, a library call
  whose result is stored once, and the backward pass compares the map with those
  stored maxima: :func:`_tiled_max`'s elementwise maxima were fused into every
  consumer, which recomputed them in its own order (the FedAvg CNN's conv2
  weight gradient transposes its input: 5.5 ms of a 33 ms step), and its
  backward pass recomputed each maximum at every element of the window. A
  training step 1.12× (LeNet-5) and 1.17× (FedAvg CNN) faster at 28×28, batch 64.
  Only for a stored map: where XLA recomputes the map in the backward pass (a
  normalisation fused into it), the recomputed values can round otherwise than
  those the reduction saw, and a window whose maximum equals none of them would
  divide its gradient by zero ties (ConvNet-3 with GroupNorm did).
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // window, window, w // window, window, c).max(axis=(2, 4))


def _tiled_max_of_stored_fwd(x, window):
  y = _tiled_max_of_stored(x, window)
  return y, (x, y)


_tiled_max_of_stored.defvjp(_tiled_max_of_stored_fwd, _tiled_max_bwd)


def avg_pool(x: jax.Array, window: int = 2, stride: int | None = None) -> jax.Array:
  """Average-pool over H, W (floor mode, no padding) via reshape + mean or slices."""
  stride = window if stride is None else stride
  b, h, w, c = x.shape
  oh, ow = (h - window) // stride + 1, (w - window) // stride + 1
  if window == stride:
    x = x[:, : oh * window, : ow * window, :]
    return x.reshape(b, oh, window, ow, window, c).mean(axis=(2, 4))
  acc = 0.0
  for i in range(window):
    for j in range(window):
      acc = acc + x[:, i : i + (oh - 1) * stride + 1 : stride,
                    j : j + (ow - 1) * stride + 1 : stride, :]
  return acc / (window * window)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over every axis between batch and channels: [B, ..., C] -> [B, C]."""
  if x.ndim == 2:
    return x
  return x.mean(axis=tuple(range(1, x.ndim - 1)))
