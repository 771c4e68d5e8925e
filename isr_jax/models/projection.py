"""MOON's projection head, an option of every classification model.

Li, He, Song, "Model-Contrastive Federated Learning" (CVPR 2021), §3.1: the
network is a base encoder, a projection head and an output layer; the
projection head is a 2-layer MLP (following SimCLR) whose output, dimension
256 in the paper's experiments, is the representation MOON contrasts (§3.2,
Eq. 3) *and* the output layer's input. The paper gives no hidden width; as in
SimCLR's head it is the encoder's output width here.

With ``projection_dim = P > 0`` a classifier maps its encoder output ``h``
(the ``features`` tap, ``[B, D]``) through ``Dense(D→D) → ReLU → Dense(D→P)``
to ``z`` (the ``projection`` tap, no activation, the model's last tap) and the
output layer ``head`` maps ``z`` to the logits (``Dense(P→K)``). So
``LocalProblem.representation`` (the last tap) is ``z``, what MOON compares,
and every ISR tap of the encoder is unchanged. ``projection_dim = 0`` (every
model's default) leaves the architecture as its paper draws it.
"""

from __future__ import annotations

import jax
from flax import nnx

from isr_jax.errors import ConfigError
from isr_jax.nn.dense import linear

PROJECTION_TAP = "projection"


def check_projection_dim(projection_dim, model: str) -> int:
  """``projection_dim`` as an int ``>= 0``; a one-line ConfigError otherwise."""
  if isinstance(projection_dim, bool) or int(projection_dim) != projection_dim or (
      projection_dim < 0):
    raise ConfigError(f"model.projection_dim={projection_dim!r} for {model} must be an "
                      "integer >= 0 (0 = no projection head)")
  return int(projection_dim)


class ProjectionHead(nnx.Module):
  """``Dense(D→D) → ReLU → Dense(D→P)`` (MOON §3.1; see the module docstring).

  Args:
    in_features: the encoder's output width ``D``.
    out_features: the projection's width ``P`` (256 in MOON's experiments).
    rngs: initialisation randomness.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
    self.fc1 = linear(in_features, in_features, rngs=rngs)
    self.fc2 = linear(in_features, out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.relu(self.fc1(x)))


def make_projection(in_features: int, projection_dim: int, *, rngs: nnx.Rngs
                    ) -> tuple[ProjectionHead | None, int]:
  """``(head or None, width of the output layer's input)``."""
  if projection_dim == 0:
    return None, in_features
  return ProjectionHead(in_features, projection_dim, rngs=rngs), projection_dim


def project(projection: ProjectionHead | None, features: jax.Array,
            taps: dict[str, jax.Array]) -> jax.Array:
  """The output layer's input: ``features``, or their projection (recorded as a tap)."""
  if projection is None:
    return features
  z = taps[PROJECTION_TAP] = projection(features)
  return z
