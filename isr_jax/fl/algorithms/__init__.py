"""The federated algorithms, one module each; :mod:`isr_jax.fl.registry` builds them
from a config. Helpers they share live in :mod:`isr_jax.fl.algorithms.shared`."""
