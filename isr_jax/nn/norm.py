"""Normalisation layers."""

from __future__ import annotations

import math

from flax import nnx


def group_norm(num_features: int, *, rngs: nnx.Rngs, groups: int = 32) -> nnx.GroupNorm:
  """GroupNorm with the largest group count <= ``groups`` dividing ``num_features``.

  GroupNorm keeps a model one parameter tree that averages across clients,
  unlike BatchNorm's running statistics.
  """
  g = math.gcd(num_features, groups)
  return nnx.GroupNorm(num_features, num_groups=g, epsilon=1e-5, rngs=rngs)
