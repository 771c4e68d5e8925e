"""A checkpoint written before a TrainState field was renamed restores under the new name,
and one written before a field was added restores with that field empty."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from isr_jax import checkpoint
from isr_jax.state import TrainState


class StateBeforeRename(NamedTuple):
  """TrainState as it was saved before ``alpha`` became ``mix_weight``."""

  params: Any
  opt_state: Any
  alg_state: Any
  client_states: Any
  rng: jax.Array
  round: jax.Array
  alpha: jax.Array


def test_state_saved_with_alpha_restores_as_mix_weight(tmp_path):
  old = StateBeforeRename({"w": jnp.arange(3.0)}, {"m": jnp.ones(3)}, {}, {},
                          jax.random.PRNGKey(4), jnp.int32(7), jnp.float32(0.25))
  manager = ocp.CheckpointManager(str(tmp_path))
  manager.save(7, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  like = TrainState({"w": jnp.zeros(3)}, {"m": jnp.zeros(3)}, {}, {}, jax.random.PRNGKey(0),
                    jnp.int32(0), jnp.float32(0))
  restored = checkpoint.restore_latest(ocp.CheckpointManager(str(tmp_path)), like)
  assert isinstance(restored, TrainState)
  chex.assert_trees_all_equal(tuple(restored)[:len(old)], tuple(old))
  assert float(restored.mix_weight) == 0.25
  assert restored.channel_state == {}  # written before the channel had a state


class StateBeforeChannel(NamedTuple):
  """TrainState as it was saved before ``channel_state`` was added."""

  params: Any
  opt_state: Any
  alg_state: Any
  client_states: Any
  rng: jax.Array
  round: jax.Array
  mix_weight: jax.Array


def test_state_saved_before_the_channel_restores_with_an_empty_channel_state(tmp_path):
  old = StateBeforeChannel({"w": jnp.arange(3.0)}, {}, {}, {}, jax.random.PRNGKey(4),
                           jnp.int32(3), jnp.float32(0.5))
  manager = ocp.CheckpointManager(str(tmp_path))
  manager.save(3, args=ocp.args.StandardSave(old))
  manager.wait_until_finished()
  like = TrainState({"w": jnp.zeros(3)}, {}, {}, {}, jax.random.PRNGKey(0), jnp.int32(0),
                    jnp.float32(0))
  restored = checkpoint.restore_latest(ocp.CheckpointManager(str(tmp_path)), like)
  chex.assert_trees_all_equal(tuple(restored)[:7], tuple(old))
  assert restored.channel_state == {}


def test_state_saved_under_todays_names_restores_unchanged(tmp_path):
  state = TrainState({"w": jnp.arange(3.0)}, {}, {}, {}, jax.random.PRNGKey(4), jnp.int32(2),
                     jnp.float32(0.5))
  manager = ocp.CheckpointManager(str(tmp_path))
  manager.save(2, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  restored = checkpoint.restore_latest(ocp.CheckpointManager(str(tmp_path)), state)
  chex.assert_trees_all_equal(restored, state)
