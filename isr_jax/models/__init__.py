"""Models with taps, and the registry that builds them from a config.

Every model maps an NHWC float32 batch to ``(logits, taps)``, lists its tap names
(input side first) in ``tap_names`` and keeps its output layer in ``self.head``.
Classification models (``task = "classification"``) end their taps with
``"features"``, or with ``"projection"`` when built with MOON's projection head
(``projection_dim > 0``, :mod:`isr_jax.models.projection`); segmentation models
(``task = "segmentation"``: DeepLabv3+, TopFormer, SeaFormer) return logits
``[B, H, W, K]`` at the input resolution and end their taps with ``"decoder"``,
the classifier's input map.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.models.cnn import ConvNet, ConvNet3, ConvNet4, FedAvgCNN, LeNet5
from isr_jax.models.deeplab import DeepLabV3Plus
from isr_jax.models.resnet import BasicBlock, ResNet18, ResNetBackbone
from isr_jax.models.seaformer import SeaFormer
from isr_jax.models.topformer import TopFormer
from isr_jax.nn.lowering import CONV_IMPLS

MODELS: dict[str, type] = {
    "convnet3": ConvNet3,
    "convnet4": ConvNet4,
    "deeplabv3plus": DeepLabV3Plus,
    "fedavg_cnn": FedAvgCNN,
    "lenet5": LeNet5,
    "resnet18": ResNet18,
    "seaformer": SeaFormer,
    "topformer": TopFormer,
}

# Constructor arguments every model takes from create_model itself.
_COMMON_ARGS = ("self", "num_classes", "input_shape", "rngs", "conv_impl")


def model_options(name: str) -> tuple[str, ...]:
  """The model-specific keyword options ``create_model(name, ...)`` accepts.

  Args:
    name: a key of :data:`MODELS`.

  Returns:
    Option names, sorted.

  Raises:
    ConfigError: ``name`` is not a registered model.
  """
  if name not in MODELS:
    raise ConfigError(f"model.name={name!r} is not one of {sorted(MODELS)}")
  params = inspect.signature(MODELS[name].__init__).parameters
  return tuple(sorted(p for p in params if p not in _COMMON_ARGS))


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    rngs: nnx.Rngs,
    conv_impl: str = "auto",
    **options,
) -> nnx.Module:
  """Builds the model registered as ``name``.

  Args:
    name: config name, a key of :data:`MODELS`.
    num_classes: number of output logits.
    input_shape: ``(H, W, C)`` of one example.
    rngs: initialisation randomness.
    conv_impl: one of :data:`~isr_jax.nn.lowering.CONV_IMPLS` (see
      :class:`isr_jax.nn.conv.Conv`).
    **options: model-specific options (e.g. ``width`` for the ConvNets,
      ``stem`` / ``width_multiplier`` for ResNet-18).

  Returns:
    The model, an ``nnx.Module`` whose state is all ``nnx.Param``.

  Raises:
    ConfigError: unknown model name, option or ``conv_impl``, or an option value
      the model rejects.
  """
  allowed = model_options(name)
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ConfigError(
        f"model.{unknown[0]}={options[unknown[0]]!r} is not an option of "
        f"model.name={name!r}; its options are {list(allowed)}"
    )
  if conv_impl not in CONV_IMPLS:
    raise ConfigError(f"model.conv_impl={conv_impl!r} is not one of {list(CONV_IMPLS)}")
  build = functools.partial(
      MODELS[name], num_classes, tuple(input_shape), conv_impl=conv_impl, **options)
  return build_compiled(build, rngs)


# The constructor runs once: LLVM's optimisations would cost more than they save.
_BUILD_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                           "xla_llvm_disable_expensive_passes": True}


def build_compiled(build: Callable[..., nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """``build(rngs=rngs)``, with all its initializers in one XLA program.

  Run eagerly, every initializer of every distinct parameter shape is an XLA
  compile of its own (a truncated normal costs 0.1–0.6 s on a CPU): 3.4 s for
  LeNet-5 and 10 s for TopFormer, in every process that builds a model. Traced
  once and compiled without optimisation the same constructor takes 1.0 s and
  4.8 s (2-core CPU). The values are those of the eager constructor up to float
  rounding (the same keys, split the same way), and ``rngs`` advances as it
  would have. Inside another trace (a model built under ``jit`` or
  ``eval_shape``) the constructor simply joins that trace.
  """
  if isinstance(jnp.zeros(()), jax.core.Tracer):
    return build(rngs=rngs)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(rngs=nnx.clone(rngs))))
  rngs_graph, rngs_state = nnx.split(rngs)

  def init(rngs_state):
    local_rngs = nnx.merge(rngs_graph, rngs_state)
    return nnx.state(build(rngs=local_rngs)), nnx.state(local_rngs)

  state, rngs_state = jax.jit(init, compiler_options=_BUILD_COMPILER_OPTIONS)(rngs_state)
  nnx.update(rngs, rngs_state)
  return nnx.merge(graphdef, state)


__all__ = [
    "MODELS",
    "BasicBlock",
    "ConvNet",
    "ConvNet3",
    "ConvNet4",
    "DeepLabV3Plus",
    "FedAvgCNN",
    "LeNet5",
    "ResNet18",
    "ResNetBackbone",
    "SeaFormer",
    "TopFormer",
    "create_model",
    "model_options",
]
