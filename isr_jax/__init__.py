"""isr_jax: intermediate supervision and regularization (OmniISR), FedSoL and FedAIMS in JAX.

The public API, by concern:

* losses — :func:`cross_entropy`, :func:`mi_loss`, :func:`negative_entropy`,
  :func:`isr_loss` (OmniISR paper Eq. 2–5);
* taps — :func:`select_taps`, :func:`make_isr_spec`, :class:`ISRSpec`;
* models — :func:`create_model` (Flax NNX, ``__call__ -> (logits, taps)``);
* training — :func:`train_and_evaluate`, :func:`build_experiment`,
  :func:`default_config`; the pure rounds live in :mod:`isr_jax.fl`,
  :mod:`isr_jax.hybrid` and :mod:`isr_jax.centralized`.
"""

from isr_jax.config import default_config, validate
from isr_jax.experiment import build_experiment
from isr_jax.losses import cross_entropy, isr_loss, mi_loss, negative_entropy
from isr_jax.models import MODELS, create_model
from isr_jax.state import TrainState
from isr_jax.taps import ISRSpec, TapTerm, make_isr_spec, select_taps
from isr_jax.train import train_and_evaluate

__version__ = "0.1.0"

__all__ = [
    "MODELS",
    "ISRSpec",
    "TapTerm",
    "TrainState",
    "build_experiment",
    "create_model",
    "cross_entropy",
    "default_config",
    "isr_loss",
    "make_isr_spec",
    "mi_loss",
    "negative_entropy",
    "select_taps",
    "train_and_evaluate",
    "validate",
]
