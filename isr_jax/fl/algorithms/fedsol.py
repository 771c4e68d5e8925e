"""FedSAM, FedASAM and FedSoL: sharpness-aware local steps (see :mod:`isr_jax.sam`).

* FedSAM (Qu et al., ICML 2022; Caldarola et al., ECCV 2022): local SAM, A = B =
  the client objective, ``ε = ρ g/‖g‖``.
* FedASAM (Caldarola et al., ECCV 2022): local ASAM, ``ε = ρ T² g/‖T g‖``,
  ``T = |w| + η``.
* FedSoL (Lee et al., CVPR 2024, FedSoL paper §3.1, Eq. 3–4; App. G–I):
  ``g_p = ∇_w L_p(w; w_g)``, ``ε = ρ Λ ⊙ g_p/‖g_p‖``,
  ``w ← w − γ ∇L_local(w + ε)``. ``L_p`` is by default
  ``KL(softmax(z_g/τ) ‖ softmax(z_k/τ))`` on the local batch (τ = 3); any base
  algorithm's proximal term can replace it (App. H: FedProx, FedDyn, MOON),
  and FedSoL then inherits that algorithm's state and server rule.

A *proximal loss* is ``(params, anchor, ctx, batch, problem, key) -> scalar``:
``anchor`` is the global model ``w_g`` of the round and ``ctx`` the base
algorithm's own client context (FedDyn's ``h_i``, MOON's previous model).

A proximal loss may come with a *stationarity predicate*
``(params, anchor, ctx) -> bool``: True where its gradient is zero by
construction (the KL at ``w_k = w_g``: every round's first local step). There ``g_p``
is set to exactly 0, so ``ε = 0``. The computed gradient is *not* exactly zero
there under ``jax.jit``: ``z_k`` and ``z_g`` come from two separately compiled
forward passes and differ by rounding (~1e-9 in ``g_p`` on LeNet-5), and
normalising that noise would give a full ρ-sized step in a random direction
(methods §4: no perturbation on the first step). A tolerance on ``‖g_p‖`` could not
tell noise from a genuinely small gradient for every model and scale; the
predicate compares parameters bit for bit, which rounding cannot fool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_flag, check_number, check_one_of
from isr_jax.fl.algorithm import FLAlgorithm, loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.personal import is_head
from isr_jax.sam import perturbation, perturbed_gradient

PERTURB_TARGETS = ("all", "head", "body")
ProximalLoss = Callable[..., jax.Array]
Stationary = Callable[[Any, Any, Any], jax.Array]  # (params, anchor, ctx) -> bool scalar


def trees_equal(a: Any, b: Any) -> jax.Array:
  """Whether two pytrees are equal leaf by leaf, bit for bit, as a traced bool."""
  same = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.all(x == y), a, b))
  return functools.reduce(jnp.logical_and, same, jnp.asarray(True))


def model_at_anchor(params: Any, anchor: Any, ctx: Any = None) -> jax.Array:
  """Stationarity of a loss that depends on the model part only, such as the KL
  (its gradient ``(p_k − p_g)/τ`` in ``z_k`` vanishes when ``w_k = w_g``)."""
  del ctx
  return trees_equal(params["model"], anchor["model"])


def params_at_anchor(params: Any, anchor: Any, ctx: Any = None) -> jax.Array:
  """Stationarity of a loss of every parameter, such as FedProx's ``μ/2 ‖w − w_g‖²``."""
  del ctx
  return trees_equal(params, anchor)


def head_body_mask(params: Any, target: str) -> Any:
  """Which leaves a partial perturbation touches: the model's ``head``, the
  rest of the model (``body``), or everything including ISR adapters."""

  def mark(path, _):
    in_model = getattr(path[0], "key", None) == "model"
    head = is_head(path)
    return {"all": True, "head": head, "body": in_model and not head}[target]

  return jax.tree_util.tree_map_with_path(mark, params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def softened_kl(z_k: jax.Array, z_g: jax.Array, tau: float) -> jax.Array:
  """``KL(softmax(z_g/τ) ‖ softmax(z_k/τ))`` per position (last axis = classes).

  Its gradient in ``z_k`` is given in closed form, ``(p_k − p_g)/τ``, which is
  exactly zero when ``z_k == z_g``. Autodiff of the same expression gives
  ``(p_k Σp_g − p_g)/τ`` with ``Σp_g = 1`` only up to rounding: ~1e-8 of noise
  that the SAM normalisation would blow up into a full ρ-sized perturbation in
  a random direction on FedSoL's first local step, where ``w_k = w_g``. That
  covers bit-equal logits only: under ``jax.jit`` the two forward passes give
  ``z_k ≠ z_g`` by rounding, which :func:`model_at_anchor` takes care of.
  """
  log_p_k = jax.nn.log_softmax(z_k / tau, axis=-1)
  log_p_g = jax.nn.log_softmax(z_g / tau, axis=-1)
  return jnp.sum(jnp.exp(log_p_g) * (log_p_g - log_p_k), axis=-1)


def _softened_kl_fwd(z_k, z_g, tau):
  return softened_kl(z_k, z_g, tau), (z_k, z_g)


def _softened_kl_bwd(tau, residuals, cotangent):
  z_k, z_g = residuals
  diff = jax.nn.softmax(z_k / tau, axis=-1) - jax.nn.softmax(z_g / tau, axis=-1)
  return cotangent[..., None] * diff / tau, jnp.zeros_like(z_g)


softened_kl.defvjp(_softened_kl_fwd, _softened_kl_bwd)


def kl_proximal_loss(tau: float = 3.0) -> ProximalLoss:
  """``KL(softmax(z_g/τ) ‖ softmax(z_k/τ))``, mean over the batch's real examples.

  ``z_g`` are the global model's logits (no gradient flows into them). As in the
  authors' code there is no τ² factor (the SAM normalisation removes the scale).
  """

  def loss(params, anchor, ctx, batch, problem, key):
    del ctx, key
    z_k, _ = problem.apply(params["model"], batch.x)
    z_g, _ = problem.apply(jax.lax.stop_gradient(anchor["model"]), batch.x)
    kl = softened_kl(z_k, z_g, tau)
    kl = kl.reshape(kl.shape[0], -1).mean(axis=1)  # dense outputs: mean over pixels
    m = batch.mask.astype(kl.dtype)
    return jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)

  return loss


def _with_global(base: FLAlgorithm) -> Callable:
  def client_init(broadcast, client_state, client_data):
    return {"base": base.client_init(broadcast, client_state, client_data),
            "global": broadcast.params}

  return client_init


def _unwrap(fn: Callable) -> Callable:
  """A base function of ``(broadcast, ctx, ...)`` called with the wrapped ctx."""

  def wrapped(broadcast, ctx, *args):
    return fn(broadcast, ctx["base"], *args)

  return wrapped


def sharpness_aware(
    name: str,
    base: FLAlgorithm,
    *,
    rho: float,
    proximal_loss: ProximalLoss | None = None,
    stationary: Stationary | None = None,
    adaptive_radius: bool = False,
    asam_eta: float | None = None,
    perturb: str = "all",
) -> FLAlgorithm:
  """``base`` with its local gradient replaced by the SAM-style step.

  Args:
    name: the algorithm's config name.
    base: supplies state, context, message and server rule.
    rho: radius ρ ≥ 0; ρ = 0 is exactly ``∇L_local`` at ``w`` (the base step
      without its own gradient modification).
    proximal_loss: loss A; ``None`` for A = B = the client objective (SAM).
    stationary: where loss A's gradient vanishes by construction (see the
      module docstring); ``None`` when it has no such points, or when its
      gradient is computed exactly zero there anyway.
    adaptive_radius: FedSoL's Λ (anchor: the global model).
    asam_eta: ASAM's η, or ``None``.
    perturb: ``all``, ``head`` or ``body``.
  """
  if perturb not in PERTURB_TARGETS:
    raise ValueError(f"perturb={perturb!r} is not one of {list(PERTURB_TARGETS)}")

  def client_grad(params, ctx, batch, problem, key):
    tx = perturbation(rho, adaptive_radius=adaptive_radius, asam_eta=asam_eta,
                      mask=None if perturb == "all" else head_body_mask(params, perturb))
    grad_b = lambda p: loss_grad(p, batch, problem)
    if proximal_loss is None:
      grad_a, aux = grad_b(params)
    else:
      grad_a = jax.grad(proximal_loss)(params, ctx["global"], ctx["base"], batch, problem, key)
      if stationary is not None:
        # Rounding noise, not a direction: zero it so that ε = 0 exactly.
        still = stationary(params, ctx["global"], ctx["base"])
        grad_a = jax.tree.map(lambda g: jnp.where(still, jnp.zeros_like(g), g), grad_a)
      aux = None
    grads, aux_b, _ = perturbed_gradient(tx, tx.init(ctx["global"]), params, grad_a, grad_b)
    # Report the objective at w (A = B) or at w + ε (FedSoL, where w is not evaluated).
    return grads, aux if aux is not None else aux_b

  return base._replace(
      name=name,
      client_init=_with_global(base),
      client_grad=client_grad,
      local_update=None,  # the step is this client_grad, whatever solver the base has
      client_final=_unwrap(base.client_final),
  )


def fedsam(rho: float = 0.05, *, perturb: str = "all") -> FLAlgorithm:
  return sharpness_aware("fedsam", fedavg(), rho=rho, perturb=perturb)


def fedasam(rho: float = 0.5, *, eta: float = 0.01, perturb: str = "all") -> FLAlgorithm:
  return sharpness_aware("fedasam", fedavg(), rho=rho, asam_eta=eta, perturb=perturb)


def fedsol(rho: float = 0.1, *, adaptive: bool = False, tau: float = 3.0,
           perturb: str = "all", base: FLAlgorithm | None = None,
           proximal_loss: ProximalLoss | None = None,
           stationary: Stationary | None = None) -> FLAlgorithm:
  """FedSoL; ``base``/``proximal_loss`` default to FedAvg with the KL proximal loss
  (and ``stationary`` then to :func:`model_at_anchor`). A custom ``proximal_loss``
  brings its own ``stationary``. ``rho`` defaults to 0.1, not the paper's 2.0
  (App. C.5), which does not train this library's small models; see the
  registry's entry."""
  if proximal_loss is None:
    proximal_loss, stationary = kl_proximal_loss(tau), stationary or model_at_anchor
  return sharpness_aware(
      "fedsol", base or fedavg(), rho=rho, proximal_loss=proximal_loss,
      stationary=stationary, adaptive_radius=adaptive, perturb=perturb)


# FedSAM/FedASAM radii: the base methods' own values, SAM's ρ = 0.05 (Foret et
# al., ICLR 2021) and ASAM's ρ = 0.5, η = 0.01 (Kwon et al., ICML 2021, the
# defaults of its code). FedSoL's baselines (FedSoL paper App. C.5,
# Table 4) pick ρ = 0.1 and 1.0 for its CNN; on digits:fl both of ours train
# faster (10 rounds: FedSAM 0.728 vs 0.664, FedASAM 0.739 vs 0.661).
FEDSAM_DEFAULTS = dict(rho=0.05, perturb="all")
FEDASAM_DEFAULTS = dict(rho=0.5, eta=0.01, perturb="all")
# FedSoL: τ = 3, fixed radius (FedSoL paper §3.1, App. C.5). The paper's
# ρ = 2.0 (App. C.5, Table 4, from {0.1, 0.5, 1, 2}) is tuned for McMahan's
# CNN on CIFAR-10 at lr 0.01, 5 local epochs, 300 rounds. On this library's
# presets it does not train: at chance after 10 rounds on digits:fl (lr
# 0.05) and 0.27 vs FedAvg's 0.71 on cross_silo:dirichlet,local (lr 0.01).
# A norm-2 ε moves the digits CNN's head (‖W‖ ≈ 3) by ~40 %, and the
# gradient at w + ε is ~13× the plain one. ρ = 0.1, the grid's smallest
# value, trains on both (digits:fl 10 rounds 0.872 vs FedAvg 0.811;
# cross_silo 0.733); ρ = 0.5 gives 0.844, ρ = 1 0.533. The proximal loss
# (``proximal``) is chosen where the algorithms meet, isr_jax.fl.registry.
DEFAULTS = dict(rho=0.1, adaptive=False, tau=3.0, perturb="all", proximal="kl")


def sam_settings(config, name: str) -> dict:
  """The arguments of :func:`fedsam` / :func:`fedasam` (``eta``) / :func:`fedsol`'s
  radius, ``adaptive`` and ``perturb`` from ``config.fl.<name>``."""
  c = config.fl[name]
  out = dict(rho=check_number(c.rho, f"fl.{name}.rho", low=0),
             perturb=check_one_of(c.perturb, PERTURB_TARGETS, f"fl.{name}.perturb"))
  if "eta" in c:
    out["eta"] = check_number(c.eta, f"fl.{name}.eta", low=0)
  if "adaptive" in c:
    out["adaptive"] = check_flag(c.adaptive, f"fl.{name}.adaptive")
  return out
