"""BalanceFL (Shuai, Shen, Jiang, Zhao, Yan, Xing, IPSN 2022): long-tail FL.

"BalanceFL: Addressing Class Imbalance in Long-Tail Federated Learning". The
local update has two parts; the server averages as FedAvg (``|D_n|`` weights).

**Knowledge inheritance** (classes missing on the client). With ``P`` the
classes present in the client's data and ``M`` the missing ones:

* the supervised loss is a softmax over ``P`` only, so local training does not
  push the missing classes' logits down: ``CE_P(z, y) = −log softmax_P(z)_y``;
* the missing classes' knowledge is distilled from the round's global model:
  ``L_KD = KL(softmax_M(z_g/T) ‖ softmax_M(z/T))``, both softmaxes over ``M``
  only (0 when nothing is missing).

**Inter-class balancing** (imbalance among the present classes):

* class-balanced local sampling (classification): every local step draws its
  minibatch with replacement from the client's data, each present class equally
  likely and uniformly within a class (probability ``1 / (|P| · n_{y_i})`` per
  example), as the authors' code does (a weighted random sampler). The number
  of steps and of real examples per step are the round's schedule's; only which
  examples fill the slots changes. ``resample=False`` instead weights the
  scheduled (uniformly shuffled) batch by ``w_i = |D_n| / (|P| · n_{y_i})``
  through ``batch.weight`` (every term of the local loss, KD included; the
  weights average 1 over the client's data): the same expected loss, but not
  the same steps — on a small skewed client one example of a rare class carries
  a weight of many batch sizes (up to 25 in the digits comparison, batch 16),
  and those steps made local training erratic (experiments/RESULTS.md at commit cc57a03);
* feature-level augmentation: the feature ``f_i`` (the representation tap) of an
  example of class ``c`` is replaced, with probability ``1 − n_c / max_c' n_c'``
  (rare classes more often), by ``f_i + δ_i``, ``δ_i ~ N(0, Σ)``, where ``Σ``
  is the within-class covariance of the global model's features,
  ``Σ = Σ_c (n_c/N) Cov_c`` (unbiased per-class covariances, 0 for a class with
  one example). The supervised loss is taken on the augmented logits, the KD
  on the clean ones. The output layer is linear, so the augmented logits are
  ``z_i + δ_i W`` with ``W = params["model"]["head"]["kernel"]``.

Local objective: ``CE_P(z_aug) (+ ISR terms) + λ L_KD`` on the balanced draw
(everything weighted by ``w`` with ``resample=False``). Defaults from the
authors' code (sxontheway/BalanceFL, ``CIFAR10/config/fedlt.yaml``,
``loss/LwFloss.py``): ``λ = 1``, ``T = 2``, balanced sampling
(``balanced_loader: true``) and feature augmentation on.

Read from the authors' code (the paper's text was not available to us), and
what differs here:

* ``P``/``M`` come from the client's label histogram (``client_init``); the
  code takes them from the labels of each minibatch, which under its balanced
  sampler are nearly always all of ``P``.
* The balanced draws happen inside the algorithm's local gradient
  (``client_init`` keeps the client's data and the draw's log-probabilities),
  since the round's data schedule is shared by every algorithm; the sampler's
  epoch length is the schedule's (``⌈|D_n| / B⌉`` steps per epoch), as the
  code's sampler draws ``|D_n|`` examples per epoch.
* ``Σ`` is estimated on each minibatch (global-model features, ``δ`` drawn as
  a random combination of the centred features, whose covariance is exactly the
  estimator above), not once per round over the whole local set: the
  algorithm's ``client_init`` has no forward pass.
* The KD is a KL divergence; the code's default is the cross-entropy with the
  teacher's soft labels, which differs by the teacher's entropy (a constant:
  same gradients). No ``T²`` factor, as in the code.
* Left out: the code's small self-entropy bonus (``−0.002 · Σ_batch H``) and
  its optional second stage (classifier re-training, off in its config).

Dense labels (segmentation: labels ``[B, H, W]``, logits ``[B, H, W, K]``;
not in the paper or the authors' code, which are classification only): the unit
is the pixel. A valid pixel belongs to a real example and has a label in
``[0, K)`` (the ignore label 255 is not valid).

* ``P``/``M`` and ``n_c`` come from the client's pixel histogram (valid pixels).
* Class-balanced weights per pixel (an image holds many classes, so there is
  no class-balanced draw of images; ``resample`` is ignored),
  ``w_p = |D| / (|P| · n_{y_p})`` with
  ``|D|`` the client's number of valid pixels (0 at invalid pixels), passed as
  a weight with the labels' shape (:mod:`isr_jax.losses` weights the CE and MI
  terms per pixel and uses each image's mean weight for terms at another
  resolution).
* ``CE_P`` per pixel, the missing classes masked out of every pixel's softmax.
* ``L_KD`` per valid pixel (restricted to ``M``, weighted by ``w_p``, averaged
  over the valid pixels).
* **Feature-level augmentation is disabled for dense labels** (whatever
  ``feature_aug`` says). It cannot be made faithful per pixel: the classifier's
  input is a ``[B, h, w, C]`` map at a lower resolution than the labels, and
  the model upsamples the head's output to the input size inside its forward
  pass, so a feature cell has no single class (its class-conditional
  covariance and its augmentation probability are undefined) and its noise
  would spread over neighbouring pixels of other classes after upsampling.

On a client whose present classes are all of the classes and equally frequent,
``P`` is everything, ``M`` is empty, ``w = 1`` and nothing is augmented: the
step is FedAvg's exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_flag, check_number
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import (
  label_counts,
  position_mean,
  position_weights,
  restricted_kl,
  valid_positions,
)

# Logit given to absent classes in CE_P; finite, so a padded example whose
# (dummy) label is an absent class gives a finite term that its mask then zeroes.
ABSENT_LOGIT = -1e9


def head_kernel(model_params) -> jax.Array:
  """The linear output layer's kernel ``[D, K]``."""
  head = model_params.get("head") if isinstance(model_params, dict) else None
  if not isinstance(head, dict) or "kernel" not in head:
    raise ValueError("balancefl needs a linear output layer params['model']['head']['kernel']")
  return head["kernel"]


def label_histogram(labels: jax.Array, mask: jax.Array, num_classes: int) -> jax.Array:
  """``n_c``: real examples (valid pixels, for dense labels) of each class.

  ``labels`` has ``mask``'s (example) axes, plus ``[H, W]`` for dense labels.
  """
  if labels.shape[:mask.ndim] != mask.shape:
    raise ValueError(f"balancefl: labels {labels.shape} do not match the examples "
                     f"{mask.shape}")
  if labels.ndim == mask.ndim:
    onehot = jax.nn.one_hot(labels.reshape(-1), num_classes, dtype=jnp.float32)
    return jnp.sum(onehot * mask.reshape(-1, 1).astype(jnp.float32), axis=0)
  return label_counts(labels, mask, num_classes)


def class_statistics(counts: jax.Array, balanced: bool) -> dict[str, jax.Array]:
  """Present classes, balancing weights ``|D|/(|P| n_c)`` and augmentation probabilities."""
  present = counts > 0
  safe = jnp.where(present, counts, 1.0)
  num_present = jnp.maximum(jnp.sum(present.astype(jnp.float32)), 1.0)
  if balanced:
    weight = jnp.where(present, jnp.sum(counts) / (num_present * safe), 0.0)
  else:
    weight = jnp.ones_like(counts)
  aug_prob = jnp.where(present, 1.0 - counts / jnp.maximum(jnp.max(counts), 1.0), 0.0)
  return {"present": present, "class_weight": weight, "aug_prob": aug_prob}


def feature_noise(key: jax.Array, features: jax.Array, labels: jax.Array, valid: jax.Array,
                  num_classes: int) -> jax.Array:
  """``δ_i ~ N(0, Σ)``, ``Σ = Σ_c (n_c/N) Cov_c`` of the (valid) rows of ``features``.

  ``δ = ε C`` with ``ε ~ N(0, 1)^{B×B}`` and ``C`` the class-centred features
  scaled by ``sqrt(n_c / ((n_c − 1) N))``, so ``Cov(δ_i) = Cᵀ C = Σ`` exactly;
  no matrix factorisation. Classes with one example contribute nothing.
  """
  f = jax.lax.stop_gradient(features)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=f.dtype) * valid[:, None]
  n_c = jnp.sum(onehot, axis=0)
  means = (onehot.T @ f) / jnp.maximum(n_c, 1.0)[:, None]
  centred = (f - onehot @ means) * valid[:, None]
  n_y = onehot @ n_c
  total = jnp.maximum(jnp.sum(valid.astype(f.dtype)), 1.0)
  scale = jnp.where(n_y > 1, jnp.sqrt(n_y / (jnp.maximum(n_y - 1, 1.0) * total)), 0.0)
  eps = jax.random.normal(key, (f.shape[0], f.shape[0]), f.dtype)
  return eps @ (centred * scale[:, None])


def balancefl(lam: float = 1.0, temperature: float = 2.0, *, balanced: bool = True,
              resample: bool = True, feature_aug: bool = True) -> FLAlgorithm:
  """BalanceFL.

  Args:
    lam: weight λ ≥ 0 of the distillation on the missing classes.
    temperature: its temperature T > 0.
    balanced: class-balanced local training.
    resample: balance by drawing class-balanced minibatches (the paper's
      sampler); ``False``: by importance weights on the scheduled batches
      (always so for dense labels). See the module docstring.
    feature_aug: feature-level augmentation of the rarer classes (classification
      only: ignored for dense labels, see the module docstring).
  """
  if lam < 0:
    raise ValueError(f"lam={lam} must be >= 0")
  if temperature <= 0:
    raise ValueError(f"temperature={temperature} must be > 0")

  def client_init(broadcast, client_state, client_data):
    """The client's label histogram ⇒ ``P``, balancing weights, augmentation probabilities.

    With class-balanced draws, also the client's examples and each one's
    log-probability ``−log(|P| n_{y_i})`` (``−∞`` for padding slots).
    """
    del client_state
    num_classes = head_kernel(broadcast.params["model"]).shape[-1]
    counts = label_histogram(client_data.y, client_data.mask, num_classes)
    ctx = {"global": broadcast.params, **class_statistics(counts, balanced)}
    if balanced and resample and client_data.y.ndim == client_data.mask.ndim:
      y, real = client_data.y.reshape(-1), client_data.mask.reshape(-1)
      # class_weight ∝ 1 / n_c over P, so its log is the draw's logit up to a constant.
      logits = jnp.log(jnp.where(real, ctx["class_weight"][y], 1.0))
      ctx.update(pool_x=client_data.x.reshape((-1,) + client_data.x.shape[2:]), pool_y=y,
                 pool_logits=jnp.where(real, logits, -jnp.inf))
    return ctx

  def client_grad(params, ctx, batch, problem, key):
    present = ctx["present"]
    dense = batch.y.ndim > batch.mask.ndim
    augment = feature_aug and not dense  # see the module docstring
    if "pool_y" in ctx:  # class-balanced draw into the scheduled slots, unweighted loss
      key, k_draw = jax.random.split(key)
      idx = jax.random.categorical(k_draw, ctx["pool_logits"], shape=batch.mask.shape)
      batch = batch._replace(x=ctx["pool_x"][idx], y=ctx["pool_y"][idx])
      weight = jnp.ones(batch.mask.shape, jnp.float32)
    else:
      weight = position_weights(ctx["class_weight"], batch.y, batch.mask)
    if batch.weight is not None:
      other = batch.weight
      if other.ndim < weight.ndim:  # per-example weights over dense labels
        other = other.reshape(other.shape + (1,) * (weight.ndim - other.ndim))
      weight = weight * other
    weighted = batch._replace(weight=weight)
    # KD positions: every example (classification), the valid pixels (dense).
    kd_valid = (valid_positions(batch.y, batch.mask, present.shape[0]) if dense
                else jnp.ones_like(batch.mask))
    z_g, taps_g = problem.apply(jax.lax.stop_gradient(ctx["global"]["model"]), batch.x)
    if augment:
      k_noise, k_pick = jax.random.split(key)
      num_classes = present.shape[0]
      noise = feature_noise(k_noise, taps_g[problem.representation], batch.y, batch.mask,
                            num_classes)
      picked = batch.mask & (jax.random.uniform(k_pick, batch.y.shape)
                             < ctx["aug_prob"][batch.y])

    def objective(p):
      logits, taps = problem.apply(p["model"], batch.x)
      sup_logits = logits
      if augment:
        kernel = head_kernel(p["model"])
        if kernel.shape[0] != noise.shape[-1]:
          raise ValueError(f"balancefl: features {noise.shape} do not feed the head kernel "
                           f"{kernel.shape}")
        sup_logits = logits + jnp.where(picked[:, None], noise @ kernel, 0.0)
      sup_logits = jnp.where(present, sup_logits, ABSENT_LOGIT)
      value, aux = problem.objective(sup_logits, taps, p["adapters"], weighted)
      kd = restricted_kl(logits, z_g, jnp.broadcast_to(~present, logits.shape), temperature)
      kd = position_mean(kd * weight, kd_valid, batch.mask)
      total = value + lam * kd
      return total, {**aux, "total": total, "kd": kd}

    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
    return grads, aux

  return fedavg()._replace(
      name="balancefl", client_init=client_init, client_grad=client_grad)


# BalanceFL (Shuai et al., IPSN 2022): λ = 1, T = 2, class-balanced sampler and
# feature augmentation on — the authors' CIFAR-10 config (sxontheway/BalanceFL,
# CIFAR10/config/fedlt.yaml: lamda 1, Temp 2, balanced_loader, feat_aug).
DEFAULTS = dict(lam=1.0, temperature=2.0, balanced=True, resample=True, feature_aug=True)


def settings(config, name: str = "balancefl") -> dict:
  """:func:`balancefl`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(
      lam=check_number(c.lam, f"fl.{name}.lam", low=0),
      temperature=check_number(c.temperature, f"fl.{name}.temperature", low=0, low_open=True),
      **{flag: check_flag(c[flag], f"fl.{name}.{flag}")
         for flag in ("balanced", "resample", "feature_aug")})
