"""FedBABU (Oh, Kim, Yun, ICLR 2022).

"FedBABU: Towards Enhanced Representation for Federated Image Classification"
(body aggregation and body update), Algorithm 1. During federated training the
head (classifier) keeps its random initialisation and is never updated: each
sampled client trains only the body (extractor) on its own data, from the
global body, and the server averages the bodies (FedAvg with the head frozen,
the authors' ``local_upt_part="body"``, ``aggr_part="body"``:
``head_lr = 0``). Personalization happens at evaluation: each client
fine-tunes the global model for τ epochs on its own training data and is
evaluated with the fine-tuned model.

Here the head is a frozen leaf of the local optimizer (its update is zeroed
after momentum and weight decay), so it stays bit-identical to the initial
head; only the rest of the tree (the body, and the ISR adapters, which read
the body's taps) goes up and down: the message and the downlink omit the head
(FedAIMS Table 6: ``β Σ`` each way), and the pseudo-gradient is zero there.
:attr:`FLAlgorithm.eval_model` fine-tunes with the engine's local optimizer at
the round's learning rate for ``fl.fedbabu.finetune_epochs`` epochs (E_ft) on
the client's own training split; nothing of the fine-tuning is kept.

What is fine-tuned, ``fl.fedbabu.finetune_part``:

* ``"all"`` (default): the whole model, body and head, as FedBABU's
  personalization does (so do the Flower baseline, adap/flower
  ``baselines/fedbabu/fedbabu/task.py`` ``finetune``, and PFLlib's
  ``clientbabu.fine_tune(which_module=['base', 'head'])``);
* ``"head"``: the head only, as FedAIMS's baseline list words it
  (FedAIMS paper §5.1: "fine-tune the personalized head at test time").

Default E_ft = 5: FedAIMS §5.1 and the Flower baseline's ``num-finetune-epochs``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from isr_jax.config_checks import check_integer, check_one_of
from isr_jax.fl.algorithm import FLAlgorithm, loss_grad, weighted_sum
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import not_head, require_head
from isr_jax.fl.personal import is_head, merge, select

FINETUNE_PARTS = ("all", "head")
FINETUNE_STREAM = 2  # an independent shuffle for the fine-tuning epochs


def local_update(start, ctx, trainer):
  """The round's local epochs on everything but the head (frozen at its initialisation)."""
  grad = lambda p, batch, key: loss_grad(p, batch, trainer.problem)
  params, aux_sum, num_steps = trainer.train(start, grad, trainable=not_head)
  return params, ctx, aux_sum, num_steps


def client_final(broadcast, ctx, local_params, num_steps, client_state):
  """Uploads the change of the body (and adapters) ``θ_n − θ_t``; the head never moves."""
  del ctx, num_steps
  delta = jax.tree.map(lambda a, b: a - b, local_params, broadcast.params)
  return {"delta": select(delta, not_head)}, client_state


def server_update(params, alg_state, messages, weights):
  mean = weighted_sum(messages["delta"], weights)
  zeros = jax.tree.map(jnp.zeros_like, params)
  return merge(zeros, jax.tree.map(lambda d: -d, mean)), alg_state


def fedbabu(finetune_epochs: int = 5, finetune_part: str = "all") -> FLAlgorithm:
  """FedBABU with ``finetune_epochs`` (E_ft ≥ 0; 0 = the global model) at evaluation."""
  if int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
    raise ValueError(f"finetune_epochs={finetune_epochs} must be an integer >= 0")
  if finetune_part not in FINETUNE_PARTS:
    raise ValueError(f"finetune_part={finetune_part!r} is not one of {FINETUNE_PARTS}")
  finetune_epochs = int(finetune_epochs)

  def eval_model(params, client_state, trainer):
    del client_state
    if finetune_epochs > 0:
      grad = lambda p, batch, key: loss_grad(p, batch, trainer.problem)
      params, _, _ = trainer.train(
          params, grad, epochs=finetune_epochs, stream=FINETUNE_STREAM,
          trainable=is_head if finetune_part == "head" else None)
    return lambda x: trainer.problem.apply(params["model"], x)[0]

  return fedavg()._replace(
      name="fedbabu", init_server_state=require_head("fedbabu"), client_final=client_final,
      server_update=server_update, downlink=lambda broadcast: select(broadcast.params, not_head),
      local_update=local_update, eval_model=eval_model)


# FedBABU (Oh, Kim, Yun, ICLR 2022): E_ft = 5 fine-tuning epochs at evaluation
# (FedAIMS §5.1; the Flower baseline's num-finetune-epochs) of the whole model,
# as FedBABU personalizes ("head": FedAIMS's wording, the head only).
DEFAULTS = dict(finetune_epochs=5, finetune_part="all")


def settings(config, name: str = "fedbabu") -> dict:
  """:func:`fedbabu`'s arguments from ``config.fl.<name>``."""
  c = config.fl[name]
  return dict(
      finetune_epochs=check_integer(c.finetune_epochs, f"fl.{name}.finetune_epochs", low=0),
      finetune_part=check_one_of(c.finetune_part, FINETUNE_PARTS, f"fl.{name}.finetune_part"))
