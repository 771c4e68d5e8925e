"""Flatness of a minimum: the top eigenvalue of the loss Hessian, by power iteration.

FedSoL (Lee et al., §5 and Figure 4) argues that its SAM-style local step leads
the global model to flatter minima, and measures flatness as the dominant
eigenvalue λ₁ of the Hessian of the global model's training loss (after
Foret et al.'s SAM and PyHessian, Yao et al. 2020). This module computes that
number for any scalar ``loss_fn(params)`` over a parameter pytree without
forming the Hessian: power iteration on Hessian-vector products, the whole
iteration one jitted ``lax.while_loop``.

Each HVP is reverse over reverse, ``∇_θ ⟨∇_θ L(θ), v⟩`` (two ``jax.grad``),
not the cheaper forward over reverse (``jax.jvp`` of ``jax.grad``): the models'
fast CPU lowerings are ``jax.custom_vjp`` functions (every dense layer's
:func:`~isr_jax.nn.dense.matmul`, the ``xla_cpu`` / ``banded`` / ``im2col``
convolutions, the tiled max-pools), and forward mode cannot enter a custom VJP
while reverse mode differentiates its backward rule like any JAX function. So
the Hessian measured is that of the very program that trains, lowering
included, at about 1.5× the cost of forward over reverse.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax import lax
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from isr_jax.losses import cross_entropy


def hessian_vector_product(loss_fn: Callable[[Any], jax.Array], params, vector):
  """``H(params) · vector = ∇_θ ⟨∇_θ loss_fn(θ), vector⟩`` (Pearlmutter 1994), reverse over
  reverse so that it goes through custom VJPs (module docstring)."""
  return jax.grad(lambda p: otu.tree_vdot(jax.grad(loss_fn)(p), vector))(params)


class HessianEigen(NamedTuple):
  """Result of :func:`top_hessian_eigenvalue`.

  Attributes:
    eigenvalue: the Rayleigh quotient ``vᵀHv`` of the last unit iterate ``v``:
      the estimate of the eigenvalue of largest magnitude, with its sign.
    vector: the next iterate ``Hv / ‖Hv‖``, a unit pytree like ``params`` (the
      eigenvector estimate; its own Rayleigh quotient converges to
      ``eigenvalue``). Its sign is arbitrary, and alternates between iterations
      when the eigenvalue is negative.
    iterations: Hessian-vector products computed.
    relative_change: ``|λ_k − λ_{k−1}| / |λ_k|`` at the last iteration
      (``inf`` after a single iteration).
  """

  eigenvalue: jax.Array
  vector: Any
  iterations: jax.Array
  relative_change: jax.Array


def random_unit_like(key: jax.Array, params):
  """A random direction in parameter space: a unit-norm pytree like ``params``, Gaussian.

  Drawn as one normal vector over all parameters, split into leaves: one
  threefry per leaf (``optax.tree_utils.tree_random_like``) took LeNet-5's
  power iteration from 4.5 to 13 s of compile (CPU time).
  """
  flat, unravel = ravel_pytree(params)
  v = jax.random.normal(key, flat.shape, flat.dtype)
  return unravel(v / jnp.linalg.norm(v))


@jax.jit
def _power_iteration(loss_fn: Partial, params, key: jax.Array, num_iters: jax.Array,
                     tol: jax.Array) -> HessianEigen:
  hvp = functools.partial(hessian_vector_product, loss_fn, params)
  tiny = jnp.finfo(jnp.float32).tiny

  def unit(tree):
    return otu.tree_scale(1.0 / jnp.maximum(otu.tree_norm(tree), tiny), tree)

  def cond(carry):
    i, _, _, rel = carry
    return (i < num_iters) & (rel >= tol)  # a NaN rel stops too

  def body(carry):
    i, v, eigenvalue, _ = carry
    hv = hvp(v)
    new = otu.tree_vdot(v, hv)  # ‖v‖ = 1: the Rayleigh quotient
    rel = jnp.abs(new - eigenvalue) / jnp.maximum(jnp.abs(new), tiny)
    return i + 1, unit(hv), new, rel

  v0 = random_unit_like(key, params)
  inf = jnp.asarray(jnp.inf, jnp.float32)
  iterations, vector, eigenvalue, rel = lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), v0, inf, inf))
  return HessianEigen(eigenvalue, vector, iterations, rel)


def top_hessian_eigenvalue(
    loss_fn: Callable[[Any], jax.Array],
    params,
    *,
    key: jax.Array,
    num_iters: int = 100,
    tol: float = 1e-4,
) -> HessianEigen:
  """The dominant eigenvalue of ``∇² loss_fn(params)`` by power iteration on HVPs.

  Power iteration ``v ← Hv / ‖Hv‖`` from a random unit vector, with the
  eigenvalue estimated each step by the Rayleigh quotient ``λ_k = vᵀHv``, HVPs
  by :func:`hessian_vector_product`. It converges to the eigenvalue of largest
  MAGNITUDE ``λ = argmax_i |λ_i|``, returned with its sign: the top eigenvalue
  λ₁ of FedSoL's Figure 4 when the spectrum's positive end dominates (as at a
  minimum, where H is close to positive semi-definite), the most negative one
  otherwise. The error shrinks like ``(λ₂/λ₁)^{2k}``; a close second eigenvalue
  means slow convergence, which ``relative_change`` shows. A ReLU network's loss
  is twice differentiable only off its kinks: at a point on one (a fresh model's
  zero biases on inputs with empty regions put whole units there) the HVP, and so
  the estimate, depends on how the compiled program differentiates the kink.

  The loop stops once ``|λ_k − λ_{k−1}| / |λ_k| < tol`` or after ``num_iters``
  HVPs, and runs as one jitted ``lax.while_loop``. ``loss_fn`` is an argument
  of that jitted function, so the arrays of a :class:`jax.tree_util.Partial`
  (what :func:`mean_over_batches` returns) are passed to it, not baked into
  the program as constants; a plain function is wrapped in one.

  Args:
    loss_fn: ``params -> scalar`` loss, twice differentiable by reverse mode.
    params: the point, a pytree of float arrays.
    key: PRNG key of the starting vector.
    num_iters: the most HVPs to compute (at least 1).
    tol: relative change of the estimate below which the iteration stops.

  Returns:
    :class:`HessianEigen`: eigenvalue, eigenvector estimate, iterations, and
    the last relative change.
  """
  if num_iters < 1:
    raise ValueError(f"num_iters={num_iters} must be at least 1")
  if not isinstance(loss_fn, Partial):
    loss_fn = Partial(loss_fn)
  return _power_iteration(loss_fn, params, key, jnp.asarray(num_iters, jnp.int32),
                          jnp.asarray(tol, jnp.float32))


def _batched_mean(batch_loss, batches, masks, counts, total, params):
  def body(acc, xs):
    batch, mask, count = xs
    return acc + count * batch_loss(params, batch, mask), None

  acc, _ = lax.scan(body, jnp.zeros((), jnp.float32), (batches, masks, counts))
  return acc / total


def mean_over_batches(
    batch_loss: Callable[[Any, Any, jax.Array], jax.Array],
    data,
    *,
    batch_size: int,
) -> Partial:
  """``loss_fn(params) = (1/N) Σ_b n_b · batch_loss(params, batch_b, mask_b)``.

  The mean loss over a fixed set of ``N`` examples, computed in batches of
  ``batch_size`` (a ``lax.scan``, so that only one batch's activations, and
  their tangents under an HVP, are live at a time): the Hessian of the returned
  function is that of the mean training loss over those examples. The last
  batch is padded with copies of the final example, masked out.

  Args:
    batch_loss: ``(params, batch, mask) -> mean loss over the batch's examples
      where mask is True`` (``mask`` is ``[batch_size]`` bool).
    data: a pytree of arrays sharing a leading example axis of size ``N``.
    batch_size: examples per batch (capped at ``N``).

  Returns:
    ``loss_fn(params)`` as a :class:`jax.tree_util.Partial` holding the
    batches, for :func:`top_hessian_eigenvalue`.
  """
  n = len(jax.tree.leaves(data)[0])
  if n == 0 or batch_size < 1:
    raise ValueError(f"need at least one example and batch_size >= 1, got {n} and "
                     f"{batch_size}")
  batch_size = min(batch_size, n)
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n

  def batched(a):
    a = np.asarray(a)
    a = np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else a
    return jnp.asarray(a.reshape(num_batches, batch_size, *a.shape[1:]))

  masks = (np.arange(num_batches * batch_size) < n).reshape(num_batches, batch_size)
  counts = masks.sum(axis=1).astype(np.float32)
  return Partial(functools.partial(_batched_mean, batch_loss), jax.tree.map(batched, data),
                 jnp.asarray(masks), jnp.asarray(counts), jnp.float32(n))


def _cross_entropy_batch(apply, ignore_index, params, batch, mask):
  images, labels = batch
  logits, _ = apply(params, images)
  return cross_entropy(logits, labels, mask=mask, ignore_index=ignore_index)


def model_cross_entropy(
    apply: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    images,
    labels,
    *,
    batch_size: int,
    ignore_index: int | None = None,
) -> Partial:
  """The mean cross-entropy (OmniISR Eq. 2) of a model over fixed examples.

  Plain cross-entropy of the logits, no ISR terms: the training loss whose
  Hessian FedSoL's flatness argument is about. For segmentation each batch's
  pixel mean is weighted by its example count.

  Args:
    apply: ``(model_params, x) -> (logits, taps)`` (``Experiment.apply``,
      :func:`isr_jax.objective.make_apply`).
    images: ``[N, H, W, C]`` inputs.
    labels: ``[N]`` (or ``[N, H, W]``) integer labels.
    batch_size: examples per forward pass.
    ignore_index: label excluded from the mean (segmentation).

  Returns:
    ``loss_fn(model_params)``, see :func:`mean_over_batches`.
  """
  return mean_over_batches(functools.partial(_cross_entropy_batch, apply, ignore_index),
                           (images, labels), batch_size=batch_size)
