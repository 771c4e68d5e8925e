"""FedAIMS (FedAIMS paper §4): federated adaptive intermediate supervision.

Personalized FL with a shared backbone φ and a personal head ψ (FedPer's split,
``personal="head"``). Per round (Algorithm 1):

* the server assigns each sampled client ``i`` one intermediate block ``b_i``
  (*supervision sampling*, Algorithm 2, :func:`supervision_sampling`), inside
  the jitted round through the engine's ``plan_round`` hook;
* client ``i`` receives φ^t and the global last-block prototypes ``C_g^m``,
  computes its own ``C_i^m`` (Eq. 3, line 9: with the received backbone, before
  training), then trains its model and adapters on (Eq. 12)

  ``Φ_i = λ F_i + (1 − λ) A_i^{b_i}``,  ``F_i = L_CE + μ R_i^m`` (Eq. 6),
  ``A_i^j = L_CE^j + μ R_i^j`` (Eq. 7),
  ``R_i^j = Σ_{(x,y)} ‖σ_i^j(C_{g,y}^m) − φ_i^j(x)‖²`` (Eq. 8), ``λ = 1/m``;

* it uploads φ_i^{t+1} (as the delta) with ``C_i^m`` and its class counts; the
  server averages the backbones (FedAvg weights ``p_i``) and the prototypes
  (Eq. 4, :func:`aggregate_prototypes`).

FedAIMS-Full (§5.3.5, ``full=True``) supervises every block: ``Φ_i = λ F_i +
(1 − λ)/(m − 1) Σ_j A_i^j``. Both run one code path: ``A = Σ_j w_j A^j`` with
block weights ``w`` one-hot at ``b_i`` (sampled) or uniform (Full).

Algorithm 1, line 12 updates only ``σ_i^{b_i}`` (and ``L_CE^{b_i}``'s classifier):
the other blocks' σ and classifiers get a zero gradient, but the local optimizer's
weight decay and momentum would still move them (relative drift 3e-5 to 2e-4 per
round at wd 1e-4, momentum 0.9), so they are frozen through the trainer's
``trainable`` hook with the per-client flag ``w_j > 0``, a traced boolean. Full
freezes nothing.

Readings where the paper is silent (methods §4, followed as written):

* Blocks: the model's taps in block order, block m = the last tap (the head's
  input, ``problem.representation``); ``blocks`` picks a subset (it must end at
  that tap). ``φ^j(x)`` is the tap flattened per example, or its global average
  pool with ``pool=True`` (name it in results).
* Eq. 3 with an absent class: zero prototype, count 0. Eq. 4 with missing
  classes (``aggregation``): ``"present"`` averages over the clients that have
  the class, ``p_i`` renormalised among them; ``"literal"`` is ``Σ_i p_i C_i``
  with missing prototypes 0. A class no sampled client has gets a zero global
  prototype either way. The paper is silent on what that row then does in Eq.
  5/8 (``absent_classes``): ``"zero"`` uses it as it is, its examples are pulled
  toward ``σ(0)`` (and ``C_g^m = 0`` for ``R^m``); ``"mask"`` drops the examples
  whose class has global count 0 from every ``R``, and ``"mean"``/``"mse"``
  divide by the examples kept. ``C_g`` is recomputed each round from that
  round's clients.
* Prototypes are constants in the loss; before the first aggregation there is no
  ``C_g`` and every ``R`` is 0 (``alg_state["ready"]``).
* Reduction of Eq. 5/8 (``reduction``): ``"sum"`` over the batch's real examples
  of squared L2 distances (as printed; a minibatch stands for ``D_i``),
  ``"mean"`` (/N), ``"mse"`` (/(N·D_j)). μ's meaning depends on it. Measured on
  digits: with ``"sum"`` (and ``"mean"``) the quadratic in σ's output layer has
  curvature ~ 2·N·‖h‖² and local SGD at the paper's lr 0.1 (also 0.01 on
  ConvNet3, 0.05 on digits:fl's CNN) diverges or kills the features once ``R``
  switches on; ``"mse"`` trains (digits:fl, 10 rounds: personal accuracy 0.49
  vs 0.38). The library's default (the registry's) is therefore ``"mse"``, with
  μ = 1; ``"sum"`` is the equation as printed, for reproducing it literally.
* σ_i^j: Dense(D_m→h) → ReLU → Dense(h→D_j), personal, never aggregated;
  ``L_CE^j``: the ISR classification adapter on block j (global average pool →
  Dense → K), personal. Flax's Dense initialisation (LeCun normal, zero bias),
  the same for every client.
* Eq. 12 is printed with ``R_i^j``; the text and the proof use ``A_i^j``.
* Algorithm 2: cosine similarity of the clients' flattened backbones after their
  latest local training (a client never sampled holds the initial backbone, so
  in the first round all similarities are 1); clients in sampling order; the
  candidates are the groups of minimal size, ``argmin δ_{i,k}`` (Eq. 11, the
  MEAN similarity to the group's members, 0 for an empty group), ties to the
  lowest index; groups stably sorted by size ascending, the r-th supervises
  block r, so larger groups get deeper blocks.
* Communication (Table 6, ``2βΣ + π`` per round and client): up = backbone delta
  + ``C_i^m`` + its class counts (K floats, for Eq. 4's renormalisation); down =
  backbone + ``C_g^m`` (+ which classes have a global prototype, K bools, with
  ``absent_classes="mask"``). The block index is not counted.

Two choices where the paper's own numbers decide (Table 8, adapter storage):
``σ`` has ``h = 64`` hidden units and there is no σ for block m (``R^m`` compares
with ``C_g^m`` itself, Eq. 5): ResNet-18 (D_m = 512) with σ^1..σ^3 mapping to 64,
128, 256 channels at h = 64 holds 127,616 floats = 0.49 MiB, the table's CIFAR-100
and TinyImageNet value; EMNIST's 3-layer ConvNet (64 channels) with σ^1, σ^2 at
h = 64 holds 16,640 floats = 0.06 MiB, as printed. ``adapt_last=True`` adds a
σ^m (D_m→h→D_m) to ``R^m``. The same arithmetic says the paper pooled its
blocks (σ outputs ``C_j`` channels), i.e. ``pool=True``; the library's default is the
flattened map.

Memory: each client keeps its σ's and L_CE^j classifiers, and (sampled variant)
its latest backbone for Algorithm 2 — ``num_clients × |φ|`` floats.

Compute: under ``vmap`` every client runs every block's term (a per-client
branch becomes a select), weighted by ``w``; the sampled variant's saving of
Table 7 is not reproduced by construction. Skipping the unsampled blocks with a
``lax.cond`` per block, where clients are not vmapped, was measured slower on
the personalized ConvNet3 (1.08× FedAIMS-Full's round against 1.02×,
experiments/RESULTS.md at commit cc57a03): a block's auxiliary term costs less than the branch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.adapters import apply_adapter, init_adapter
from isr_jax.config_checks import check_flag, check_integer, check_number, check_one_of
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import FLAlgorithm, LocalProblem
from isr_jax.fl.algorithms.fedaims_parts import (
    AGGREGATIONS,
    REDUCTIONS,
    aggregate_prototypes,
    apply_sigma,
    block_features,
    block_names,
    client_prototypes,
    cosine_matrix,
    flat_backbone,
    init_sigma,
    prototype_distance,
    supervision_sampling,
    tap_layout,
)
from isr_jax.fl.algorithms.fedavg import server_update as fedavg_server_update
from isr_jax.fl.personal import HEAD
from isr_jax.losses import cross_entropy

PROTOTYPE_TIMES = ("start", "end")
ABSENT_CLASSES = ("zero", "mask")

# -- the algorithm --


def fedaims(*, mu: float = 1.0, lam: float | None = None, hidden: int = 64,
            reduction: str = "sum", aggregation: str = "present", pool: bool = False,
            blocks: Sequence[str] = (), adapt_last: bool = False,
            prototype_at: str = "start", absent_classes: str = "zero", full: bool = False,
            seed: int = 0, problem: LocalProblem) -> FLAlgorithm:
  """FedAIMS (``full=False``) or FedAIMS-Full, see the module docstring.

  Args:
    mu: μ ≥ 0, the weight of the prototype regulariser (Eq. 6, 7).
    lam: λ ∈ [0, 1] of Eq. 12; ``None`` = 1/m.
    hidden: σ's hidden width h.
    reduction: Eq. 5/8 over examples, one of :data:`REDUCTIONS`.
    aggregation: Eq. 4 for missing classes, one of :data:`AGGREGATIONS`.
    pool: ``φ^j`` = global average pool of the tap instead of its flattening.
    blocks: tap names of blocks 1..m (``()``: all the model's taps).
    adapt_last: a σ^m for ``R^m`` (else ``C_g^m`` is compared directly).
    prototype_at: ``"start"``: ``C_i^m`` with the received backbone, before
      training (Algorithm 1, line 9); ``"end"``: with the trained one.
    absent_classes: Eq. 5/8 for a class with no global prototype (no sampled
      client held it last round), one of :data:`ABSENT_CLASSES`: ``"zero"``
      pulls its examples toward the zero row, ``"mask"`` leaves them out of R.
    full: FedAIMS-Full (every block, no sampling).
    seed: the adapters' initialisation.
    problem: the run's :class:`LocalProblem` (the per-client adapters are sized
      from its model's taps).
  """
  if mu < 0:
    raise ValueError(f"mu={mu} must be >= 0")
  if lam is not None and not 0 <= lam <= 1:
    raise ValueError(f"lam={lam} must be in [0, 1]")
  if int(hidden) < 1:
    raise ValueError(f"hidden={hidden} must be >= 1")
  for value, allowed, name in ((reduction, REDUCTIONS, "reduction"),
                               (aggregation, AGGREGATIONS, "aggregation"),
                               (prototype_at, PROTOTYPE_TIMES, "prototype_at"),
                               (absent_classes, ABSENT_CLASSES, "absent_classes")):
    if value not in allowed:
      raise ValueError(f"{name}={value!r} is not one of {allowed}")
  name = "fedaims_full" if full else "fedaims"

  apply, representation = problem.apply, problem.representation
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 0xFEDA)
  # The global class counts travel (and are stored) only when they are read, so a
  # "zero" run's state and bytes are those of the runs before the setting existed.
  masked = absent_classes == "mask"

  def layout(model_params, x):
    """``(names of blocks 1..m, {name: tap shape})`` for one example ``x [1, ...]``."""
    shapes = tap_layout(apply, model_params, x)
    return block_names(tuple(shapes), blocks, representation), shapes

  def feature_dim(shape):
    return shape[-1] if pool else math.prod(shape[1:])

  def num_classes_of(params):
    return params["model"]["head"]["kernel"].shape[-1]

  def check_labels(labels, leading):
    if labels.ndim != leading:
      raise ConfigError(f"fl.algorithm={name!r} needs one label per example (class "
                        f"prototypes, Eq. 3); got labels of shape {tuple(labels.shape)}")

  def init_server_state(params, data):
    check_labels(data.y, 3)
    names, shapes = layout(params["model"], data.x[0, 0, :1])
    k = num_classes_of(params)
    state = {"prototype": jnp.zeros((k, feature_dim(shapes[names[-1]])), jnp.float32),
             "ready": jnp.asarray(False)}
    if masked:
      state["count"] = jnp.zeros((k,), jnp.float32)
    return state

  def init_client_state(params, client_data):
    """The personal σ^j and L_CE^j classifiers (+ the backbone for Algorithm 2)."""
    check_labels(client_data.y, 2)
    names, shapes = layout(params["model"], client_data.x[0, :1])
    d_m, k = feature_dim(shapes[names[-1]]), num_classes_of(params)
    keys = jax.random.split(key, 2 * len(names))
    adapted = names if adapt_last else names[:-1]
    state = {
        "sigma": {n: init_sigma(keys[i], d_m, int(hidden), feature_dim(shapes[n]))
                  for i, n in enumerate(adapted)},
        "ce": {n: init_adapter(keys[len(names) + i], shapes[n][-1], k)
               for i, n in enumerate(names[:-1])},
    }
    if not full:
      state["backbone"] = {k_: v for k_, v in params["model"].items() if k_ not in HEAD}
    return state

  def plan_round(alg_state, client_states, ids):
    """Algorithm 2 over the sampled clients: one-hot block weights ``[n, m − 1]``."""
    del alg_state
    num_groups = len(client_states["ce"])
    backbones = jax.vmap(flat_backbone)(client_states["backbone"])
    real = ids >= 0
    block = supervision_sampling(cosine_matrix(backbones), real, num_groups)
    return jax.nn.one_hot(block - 1, num_groups, dtype=jnp.float32) * real[:, None]

  def client_init(broadcast, client_state, client_data):
    del client_data
    own = {"sigma": client_state["sigma"], "ce": client_state["ce"]}
    num_groups = len(client_state["ce"])
    weights = (jnp.full((num_groups,), 1.0 / num_groups, jnp.float32) if broadcast.plan is None
               else broadcast.plan)
    ctx = {"own": own, "prototype": broadcast.alg_state["prototype"],
           "ready": broadcast.alg_state["ready"], "weights": weights}
    if masked:
      ctx["present"] = broadcast.alg_state["count"] > 0
    return ctx

  def objective(params, ctx, batch, problem):
    """Eq. 12 on a batch: ``(Φ_i, aux)`` at ``params = {"model", "adapters", "fedaims"}``."""
    logits, taps = problem.apply(params["model"], batch.x)
    names = block_names(tuple(taps), blocks, representation)
    m = len(names)
    lam_ = 1.0 / m if lam is None else lam
    main, aux = problem.objective(logits, taps, params["adapters"], batch)
    own = params["fedaims"]
    protos = lax.stop_gradient(ctx["prototype"])
    ready = ctx["ready"]
    y = jnp.where(batch.mask, batch.y, 0)
    # "mask": an example whose class has no global prototype is not an example of R.
    kept = batch.mask & ctx["present"][y] if masked else batch.mask

    def regulariser(name, target):
      r = prototype_distance(target[y], block_features(taps[name], pool), kept, reduction)
      return jnp.where(ready, r, 0.0)  # no C_g before the first aggregation

    last = names[-1]
    r_m = regulariser(last, apply_sigma(own["sigma"][last], protos) if adapt_last else protos)
    f = main + mu * r_m
    aux_ce, aux_r = 0.0, 0.0
    for j, name in enumerate(names[:-1]):
      w = ctx["weights"][j]
      ce_j = cross_entropy(apply_adapter(own["ce"][name], taps[name], ()), batch.y,
                           mask=batch.mask, weight=batch.weight)
      r_j = regulariser(name, apply_sigma(own["sigma"][name], protos))
      aux_ce = aux_ce + w * ce_j
      aux_r = aux_r + w * r_j
    total = lam_ * f + (1.0 - lam_) * (aux_ce + mu * aux_r)
    return total, {**aux, "fedaims/reg_last": r_m, "fedaims/aux_ce": aux_ce,
                   "fedaims/aux_reg": aux_r, "total": total}

  def client_grad(params, ctx, batch, problem, key):
    """``∇Φ_i`` over the model, the ISR adapters and the personal σ / L_CE^j params."""
    del key
    (_, aux), grads = jax.value_and_grad(objective, has_aux=True)(params, ctx, batch, problem)
    return grads, aux

  def prototypes(model_params, trainer):
    """Eq. 3 for block m over the client's own data."""
    names, _ = layout(model_params, trainer.data.x[0, :1])
    return client_prototypes(trainer.problem.apply, model_params, trainer.data, names[-1],
                             pool=pool, num_classes=model_params["head"]["kernel"].shape[-1])

  def supervised_only(model_params, trainer, weights):
    """Algorithm 1, line 12: ``trainable(path)``, False for σ^j and L_CE^j of the blocks j
    with ``w_j = 0`` (traced: the block is this client's row of the round's plan)."""
    names, _ = layout(model_params, trainer.data.x[0, :1])
    index = {name: j for j, name in enumerate(names[:-1])}

    def trainable(path):
      keys = [getattr(k, "key", k) for k in path]
      if len(keys) > 2 and keys[0] == "fedaims" and keys[2] in index:
        return weights[index[keys[2]]] > 0
      return True  # θ_i (line 11), the ISR adapters, σ^m (R^m is in F_i, every round)

    return trainable

  def local_update(start, ctx, trainer):
    """Algorithm 1, lines 9–12: ``C_i^m``, then joint training of θ_i and σ_i^{b_i}."""
    if prototype_at == "start":
      proto, count = prototypes(start["model"], trainer)
    tree = {**start, "fedaims": ctx["own"]}
    trainable = None if full else supervised_only(start["model"], trainer, ctx["weights"])
    trained, aux_sum, num_steps = trainer.train(
        tree, lambda p, b, k: client_grad(p, ctx, b, trainer.problem, k), trainable=trainable)
    local = {k: trained[k] for k in start}
    if prototype_at == "end":
      proto, count = prototypes(local["model"], trainer)
    ctx = {**ctx, "own": trained["fedaims"], "local_prototype": proto, "local_count": count}
    return local, ctx, aux_sum, num_steps

  def client_final(broadcast, ctx, local_params, num_steps, client_state):
    """Uploads the delta (the round zeroes the head's) and ``(C_i^m, counts)``."""
    del num_steps, client_state
    delta = jax.tree.map(lambda a, b: a - b, local_params, broadcast.params)
    message = {"delta": delta, "prototype": ctx["local_prototype"],
               "count": ctx["local_count"]}
    state = dict(ctx["own"])
    if not full:
      state["backbone"] = {k: v for k, v in local_params["model"].items() if k not in HEAD}
    return message, state

  def server_update(params, alg_state, messages, weights):
    """FedAvg on the backbone (line 15); Eq. 4 on the last block's prototypes (line 16)."""
    pseudo_grad, _ = fedavg_server_update(params, alg_state, messages, weights)
    proto = aggregate_prototypes(messages["prototype"], messages["count"], weights, aggregation)
    state = {"prototype": proto, "ready": jnp.asarray(True)}
    if masked:  # padding clients count 0 (no real example)
      state["count"] = jnp.sum(messages["count"], axis=0)
    return pseudo_grad, state

  def downlink(broadcast):
    down = {"params": broadcast.params, "prototype": broadcast.alg_state["prototype"]}
    if masked:
      down["present"] = broadcast.alg_state["count"] > 0
    return down

  return FLAlgorithm(
      name=name, init_server_state=init_server_state, init_client_state=init_client_state,
      client_init=client_init, client_grad=client_grad, client_final=client_final,
      server_update=server_update, downlink=downlink, personal="head", local_update=local_update,
      plan_round=None if full else plan_round)


# μ = 1 (§5.1, picked from {0.01, ..., 5} in §5.3.1); λ = None means 1/m (Eq. 12);
# h = 64 and no σ^m: Table 8's adapter storage (ResNet-18 0.49 MiB, EMNIST
# ConvNet 0.06 MiB); flattened blocks (pool False) as Eq. 5/8 are printed, but
# reduction "mse" (/(N·D_j)) instead of the printed sum over examples: with
# "sum" local SGD diverges at the paper's lr 0.1 (and at 0.01 on ConvNet3) once
# R switches on; "mse" trains. Eq. 4 over the clients that have the class
# ("present"); C_i^m before training (Algorithm 1, line 9). A class no sampled
# client held keeps its zero global prototype in R (absent_classes "zero", what
# the paper's formulas give; "mask" leaves it out). Methods §4.
DEFAULTS = dict(mu=1.0, lam=None, hidden=64, reduction="mse", aggregation="present",
                pool=False, blocks=(), adapt_last=False, prototype_at="start",
                absent_classes="zero")


def settings(config, name: str = "fedaims") -> dict:
  """:func:`fedaims`'s arguments from ``config.fl.<name>`` (``fedaims_full``: Full)."""
  c = config.fl[name]
  blocks = tuple(c.blocks)
  if not all(isinstance(b, str) for b in blocks):
    raise ConfigError(f"fl.{name}.blocks={c.blocks!r} must be tap names")
  return dict(
      mu=check_number(c.mu, f"fl.{name}.mu", low=0),
      lam=None if c.lam is None else check_number(c.lam, f"fl.{name}.lam", low=0, high=1),
      hidden=check_integer(c.hidden, f"fl.{name}.hidden"),
      reduction=check_one_of(c.reduction, REDUCTIONS, f"fl.{name}.reduction"),
      aggregation=check_one_of(c.aggregation, AGGREGATIONS, f"fl.{name}.aggregation"),
      pool=check_flag(c.pool, f"fl.{name}.pool"), blocks=blocks,
      adapt_last=check_flag(c.adapt_last, f"fl.{name}.adapt_last"),
      prototype_at=check_one_of(c.prototype_at, PROTOTYPE_TIMES, f"fl.{name}.prototype_at"),
      absent_classes=check_one_of(c.absent_classes, ABSENT_CLASSES,
                                  f"fl.{name}.absent_classes"),
      full=name == "fedaims_full", seed=int(config.seed))
