"""optax optimizers from config, with the learning rate settable per round.

Every optimizer is wrapped in ``optax.inject_hyperparams`` so that the round
function can write the round's learning rate ``η_t = η_0 · decay^t`` into the
state (FedSoL decays the local lr by 0.99 per round; hybrid mode needs η_t).
"""

from __future__ import annotations

import jax
import optax

from isr_jax.config_checks import check_number
from isr_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad", "rmsprop")


def _adam_l2(learning_rate, b1, b2, eps, weight_decay):
  # torch.optim.Adam's weight_decay is L2 added to the gradient (the paper's setting).
  return optax.chain(
      optax.add_decayed_weights(weight_decay), optax.adam(learning_rate, b1, b2, eps)
  )


def _sgd(learning_rate, momentum, nesterov, weight_decay):
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
  )


def make_optimizer(cfg, *, setting: str = "optimizer") -> optax.GradientTransformation:
  """Builds the optimizer described by ``cfg`` (an ml_collections ConfigDict).

  Fields: ``name`` (one of :data:`OPTIMIZERS`), ``learning_rate``, and where
  relevant ``momentum``, ``nesterov``, ``weight_decay``, ``b1``, ``b2``, ``eps``,
  ``initial_accumulator``.
  """
  name = cfg.name
  if name not in OPTIMIZERS:
    raise ConfigError(f"{setting}.name={name!r} is not one of {list(OPTIMIZERS)}")
  lr = check_number(cfg.learning_rate, f"{setting}.learning_rate", low=0, low_open=True)
  wd = check_number(cfg.get("weight_decay", 0.0), f"{setting}.weight_decay", low=0)
  b1 = check_number(cfg.get("b1", 0.9), f"{setting}.b1", low=0, high=1, high_open=True)
  b2 = check_number(cfg.get("b2", 0.999), f"{setting}.b2", low=0, high=1, high_open=True)
  eps = check_number(cfg.get("eps", 1e-8), f"{setting}.eps", low=0)
  if name == "sgd":
    momentum = check_number(cfg.get("momentum", 0.0), f"{setting}.momentum", low=0, high=1,
                            high_open=True)
    return optax.inject_hyperparams(_sgd, static_args=("momentum", "nesterov"))(
        learning_rate=lr, momentum=momentum, nesterov=bool(cfg.get("nesterov", False)),
        weight_decay=wd)
  if name == "adam":
    return optax.inject_hyperparams(_adam_l2)(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  if name == "adamw":
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  if name == "adagrad":
    return optax.inject_hyperparams(optax.adagrad)(
        learning_rate=lr, eps=eps,
        initial_accumulator_value=float(cfg.get("initial_accumulator", 0.1)))
  return optax.inject_hyperparams(optax.rmsprop)(learning_rate=lr, eps=eps)


def learning_rate_at(cfg, round_index: jax.Array) -> jax.Array:
  """``η_t = learning_rate · lr_decay^t`` (``lr_decay`` defaults to 1)."""
  return cfg.learning_rate * float(cfg.get("lr_decay", 1.0)) ** round_index


def with_learning_rate(opt_state, lr):
  """Returns ``opt_state`` (from :func:`make_optimizer`) with its learning rate set to ``lr``."""
  hyper = dict(opt_state.hyperparams)
  hyper["learning_rate"] = jax.numpy.asarray(lr, hyper["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hyper)
