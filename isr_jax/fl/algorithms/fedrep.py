"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, ICML 2021).

"Exploiting Shared Representations for Personalized Federated Learning",
Algorithm 1. The model is a shared representation φ (the body) and a personal
head h_i. A sampled client first fits its head to the received representation,
then updates the representation under its new head:

``h_i ← GRD(f_i(h_i, φ^t), h_i, α)``, τ_h times (φ^t fixed),
``φ_i ← GRD(f_i(h_i, φ_i), φ_i, α)``, τ_φ times (h_i fixed),

and sends only ``φ_i`` back; the server averages ``φ^{t+1} = Σ_i w_i φ_i``
(the paper's uniform mean over the sampled clients becomes the engine's
``|D_i|`` weights, as for every algorithm here). The head never travels.

Here ``personal = "head"`` (the round keeps h_i per client) and the two phases
are :attr:`FLAlgorithm.local_update`: ``fl.fedrep.head_epochs`` (E_p) epochs of
the local optimizer on the head with every other leaf frozen (their update is
zeroed after the optimizer, so momentum and weight decay do not move them),
then the round's ``fl.local_epochs`` / ``fl.local_steps`` on the body with the
head frozen, each phase with a fresh optimizer state and its own shuffle. The
ISR adapters read the body's taps: they train with the body (second phase)
and are averaged with it unless ``isr.aggregate_adapters=False``. The loss of
both phases is ``L_T`` (plain cross-entropy when ISR is off).

Defaults: E_p = 5, FedAIMS's setting (FedAIMS paper §5.1) and PFLlib's
``plocal_epochs`` for FedRep; the authors' code (lgcollins/FedRep,
``models/Update.py``) runs ``local_ep − local_rep_ep`` head epochs and then
``local_rep_ep`` = 1 representation epoch (10 and 1 in the paper's §5).
"""

from __future__ import annotations

import jax

from isr_jax.config_checks import check_integer
from isr_jax.fl.algorithm import FLAlgorithm, loss_grad
from isr_jax.fl.algorithms.fedavg import fedavg
from isr_jax.fl.algorithms.shared import not_head, require_head
from isr_jax.fl.personal import is_head

HEAD_STREAM = 1  # the head phase's shuffle; the body phase uses the round's (0)


def fedrep(head_epochs: int = 5) -> FLAlgorithm:
  """FedRep with ``head_epochs`` (E_p ≥ 1) epochs on the head before the body."""
  if int(head_epochs) != head_epochs or head_epochs < 1:
    raise ValueError(f"head_epochs={head_epochs} must be an integer >= 1")
  head_epochs = int(head_epochs)

  def local_update(start, ctx, trainer):
    grad = lambda p, batch, key: loss_grad(p, batch, trainer.problem)
    fitted, aux_head, steps_head = trainer.train(
        start, grad, epochs=head_epochs, trainable=is_head, stream=HEAD_STREAM)
    params, aux_body, steps_body = trainer.train(fitted, grad, trainable=not_head)
    aux_sum = jax.tree.map(lambda a, b: a + b, aux_head, aux_body)
    return params, ctx, aux_sum, steps_head + steps_body

  return fedavg()._replace(
      name="fedrep", init_server_state=require_head("fedrep"), personal="head",
      local_update=local_update)


# FedRep (Collins et al., ICML 2021): E_p = 5 head epochs before the round's body
# epochs, FedAIMS's setting (FedAIMS paper §5.1) and PFLlib's plocal_epochs;
# the authors' code runs local_ep − local_rep_ep head epochs, then 1 body epoch.
DEFAULTS = dict(head_epochs=5)


def settings(config, name: str = "fedrep") -> dict:
  """:func:`fedrep`'s arguments from ``config.fl.<name>``."""
  return dict(head_epochs=check_integer(config.fl[name].head_epochs, f"fl.{name}.head_epochs"))
