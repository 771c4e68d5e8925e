"""FedAIMS (papers/fedaims.txt §4): federated adaptive intermediate supervision.

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
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from isr_jax.adapters import apply_adapter, init_adapter
from isr_jax.errors import ConfigError
from isr_jax.fl.algorithm import FLAlgorithm
from isr_jax.fl.algorithms.fedavg import server_update as fedavg_server_update
from isr_jax.fl.personal import HEAD
from isr_jax.losses import cross_entropy
from isr_jax.models.layers import global_avg_pool, matmul

REDUCTIONS = ("sum", "mean", "mse")
AGGREGATIONS = ("present", "literal")
PROTOTYPE_TIMES = ("start", "end")
ABSENT_CLASSES = ("zero", "mask")
COSINE_EPS = 1e-8

# -- blocks and their features --


def block_features(tap: jax.Array, pool: bool) -> jax.Array:
  """``φ^j(x)``: the tap ``[B, ...]`` flattened to ``[B, D_j]``, or pooled to ``[B, C_j]``."""
  return global_avg_pool(tap) if pool else tap.reshape(tap.shape[0], -1)


def block_names(tap_order: Sequence[str], blocks: Sequence[str], representation: str
                ) -> tuple[str, ...]:
  """Blocks 1..m: the model's taps in block order (or ``blocks``), ending at the head's input."""
  taps = tuple(tap_order)
  names = tuple(blocks) or taps
  unknown = [n for n in names if n not in taps]
  if unknown:
    raise ConfigError(f"fl.fedaims.blocks: {unknown} not among the model's taps {list(taps)}")
  if list(names) != sorted(names, key=taps.index) or len(set(names)) != len(names):
    raise ConfigError(f"fl.fedaims.blocks={list(names)} must be distinct taps in block "
                      f"order {list(taps)}")
  if names[-1] != representation:
    raise ConfigError(f"fl.fedaims.blocks={list(names)} must end with the head's input tap "
                      f"{representation!r} (block m)")
  if len(names) < 2:
    raise ConfigError(f"fl.fedaims.blocks={list(names)}: FedAIMS needs m >= 2 blocks")
  return names


def tap_layout(apply: Callable, model_params, x: jax.Array) -> dict[str, tuple[int, ...]]:
  """Every tap's shape for the input ``x``, in the model's block order, without running it.

  The order is recorded while tracing: ``eval_shape`` returns the dict with its keys
  sorted, and the models write their taps in block order (``model.tap_names``).
  """
  order: list[str] = []

  def forward(p, x):
    _, taps = apply(p, x)
    order.extend(taps)
    return taps

  shapes = jax.eval_shape(forward, model_params, x)
  return {name: tuple(shapes[name].shape) for name in order}


# -- Eq. 3 and Eq. 4: prototypes --


def class_sums(features: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int):
  """``(Σ_{y=k} φ(x), #{y=k})`` over the real examples of one batch (Eq. 3's parts)."""
  valid = mask.astype(features.dtype)
  labels = jnp.where(mask, labels, 0)
  sums = jax.ops.segment_sum(features * valid[:, None], labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(valid, labels, num_segments=num_classes)
  return sums, counts


def prototypes_from_sums(sums: jax.Array, counts: jax.Array) -> jax.Array:
  """Eq. 3: the class means; an absent class (count 0) gets the zero prototype."""
  present = counts[:, None] > 0
  return jnp.where(present, sums / jnp.where(present, counts[:, None], 1.0), 0.0)


def client_prototypes(apply: Callable, model_params, data, block: str, *, pool: bool,
                      num_classes: int) -> tuple[jax.Array, jax.Array]:
  """``(C_i [K, D], counts [K])`` of block ``block`` over the client's data (Eq. 3).

  One pass over the client's packed batches ``data.x [S, B, ...]``.
  """

  def one_batch(carry, batch):
    x, y, mask = batch
    _, taps = apply(model_params, x)
    sums, counts = class_sums(block_features(taps[block], pool), y, mask, num_classes)
    return (carry[0] + sums, carry[1] + counts), None

  x0 = jax.ShapeDtypeStruct(data.x.shape[1:], data.x.dtype)
  feature_dim = jax.eval_shape(
      lambda x: block_features(apply(model_params, x)[1][block], pool), x0).shape[-1]
  init = (jnp.zeros((num_classes, feature_dim), jnp.float32),
          jnp.zeros((num_classes,), jnp.float32))
  (sums, counts), _ = lax.scan(one_batch, init, (data.x, data.y, data.mask))
  return prototypes_from_sums(sums, counts), counts


def aggregate_prototypes(prototypes: jax.Array, counts: jax.Array, weights: jax.Array,
                         mode: str = "present") -> jax.Array:
  """Eq. 4: ``C_g = Σ_i p_i C_i`` over the clients ``[n, K, D]`` with weights ``p`` ``[n]``.

  ``"present"``: per class, over the clients with ``counts > 0``, ``p_i``
  renormalised among them (0 where no client has the class); ``"literal"``: the
  printed sum, a missing prototype counting as 0.
  """
  if mode == "literal":
    return jnp.tensordot(weights, prototypes, axes=1)
  if mode != "present":
    raise ValueError(f"aggregation={mode!r} is not one of {AGGREGATIONS}")
  w = weights[:, None] * (counts > 0)  # [n, K]
  total = jnp.sum(w, axis=0)
  summed = jnp.einsum("nk,nkd->kd", w, prototypes)
  return jnp.where(total[:, None] > 0, summed / jnp.where(total > 0, total, 1.0)[:, None], 0.0)


# -- Algorithm 2: supervision sampling --


def flat_backbone(model_params) -> jax.Array:
  """The backbone φ (every model leaf outside the head) as one vector."""
  body = {k: v for k, v in model_params.items() if k not in HEAD}
  return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(body)])


def cosine_matrix(vectors: jax.Array) -> jax.Array:
  """``cos(v_i, v_j)`` for the rows of ``vectors`` ``[n, P]``."""
  norms = jnp.sqrt(jnp.sum(vectors * vectors, axis=1))
  unit = vectors / jnp.maximum(norms, COSINE_EPS)[:, None]
  return jnp.matmul(unit, unit.T, precision=lax.Precision.HIGHEST)


def supervision_sampling(similarity: jax.Array, real: jax.Array, num_groups: int
                         ) -> jax.Array:
  """Algorithm 2: each client's supervised block, ``1..num_groups`` (0 for padding).

  Clients in the given order go to one of ``num_groups`` (= m − 1) groups: the
  candidates are the groups of minimal current size (balance, Eq. 10's
  constraint); among them the one with the least ``δ_{i,k}`` (Eq. 11: mean
  similarity to its members, 0 when empty), ties to the lowest index. Groups
  are then stably sorted by size, ascending; the r-th supervises block r, so
  larger groups get deeper blocks.

  Args:
    similarity: ``[n, n]`` cosine similarities of the clients' backbones.
    real: ``[n]`` bool, False for padding clients (never assigned).
    num_groups: m − 1.
  """
  n = similarity.shape[0]

  def add(carry, i):
    member, sizes = carry  # member [n, G] one-hot rows; sizes [G]
    sums = similarity[i] @ member
    delta = jnp.where(sizes > 0, sums / jnp.maximum(sizes, 1).astype(sums.dtype), 0.0)
    candidate = sizes == jnp.min(sizes)
    group = jnp.argmin(jnp.where(candidate, delta, jnp.inf))  # first minimum: lowest index
    join = real[i]
    member = member.at[i, group].set(join.astype(member.dtype))
    sizes = sizes.at[group].add(join.astype(sizes.dtype))
    return (member, sizes), None

  init = (jnp.zeros((n, num_groups), similarity.dtype), jnp.zeros((num_groups,), jnp.int32))
  (member, sizes), _ = lax.scan(add, init, jnp.arange(n))
  order = jnp.argsort(sizes, stable=True)  # order[r] = the group at rank r
  rank = jnp.zeros((num_groups,), jnp.int32).at[order].set(jnp.arange(num_groups))
  group = jnp.argmax(member, axis=1)
  return jnp.where(real, rank[group] + 1, 0)


# -- Eq. 5 / 8 and the adapters --


def init_sigma(key: jax.Array, d_in: int, hidden: int, d_out: int) -> dict:
  """σ: Dense(d_in→h) → ReLU → Dense(h→d_out), Flax's Dense initialisation."""
  k1, k2 = jax.random.split(key)
  return {"hidden": init_adapter(k1, d_in, hidden), "out": init_adapter(k2, hidden, d_out)}


def apply_sigma(sigma: dict, c: jax.Array) -> jax.Array:
  h = jax.nn.relu(matmul(c, sigma["hidden"]["kernel"]) + sigma["hidden"]["bias"])
  return matmul(h, sigma["out"]["kernel"]) + sigma["out"]["bias"]


def prototype_distance(target: jax.Array, features: jax.Array, mask: jax.Array,
                       reduction: str = "sum") -> jax.Array:
  """Eq. 5/8 on a batch: ``Σ_{real b} ‖target_b − φ_b‖²`` (``sum``), /N (``mean``),
  /(N·D) (``mse``)."""
  squared = jnp.sum(jnp.square(target - features), axis=-1)
  total = jnp.sum(jnp.where(mask, squared, 0.0))
  if reduction == "sum":
    return total
  n = jnp.maximum(jnp.sum(mask.astype(total.dtype)), 1.0)
  if reduction == "mean":
    return total / n
  if reduction == "mse":
    return total / (n * features.shape[-1])
  raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")


# -- the algorithm --


def fedaims(*, mu: float = 1.0, lam: float | None = None, hidden: int = 64,
            reduction: str = "sum", aggregation: str = "present", pool: bool = False,
            blocks: Sequence[str] = (), adapt_last: bool = False,
            prototype_at: str = "start", absent_classes: str = "zero", full: bool = False,
            seed: int = 0, problem=None) -> FLAlgorithm:
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
    problem: the run's :class:`LocalProblem`; ``None`` returns the algorithm
      unbound (``bind`` fills it in, :func:`isr_jax.fl.algorithm.bind_problem`).
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
  settings = dict(mu=mu, lam=lam, hidden=hidden, reduction=reduction, aggregation=aggregation,
                  pool=pool, blocks=tuple(blocks), adapt_last=adapt_last,
                  prototype_at=prototype_at, absent_classes=absent_classes, full=full,
                  seed=seed)
  name = "fedaims_full" if full else "fedaims"

  if problem is None:
    def unbound(*args, **kwargs):
      raise ValueError(f"{name}: the algorithm depends on the model's taps; bind it to the "
                       "run's problem first (isr_jax.fl.algorithm.bind_problem)")

    return FLAlgorithm(
        name=name, init_server_state=unbound, init_client_state=unbound, client_init=unbound,
        client_grad=unbound, client_final=unbound, server_update=unbound, personal="head",
        bind=lambda problem: fedaims(**settings, problem=problem))

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
      name=name,
      init_server_state=init_server_state,
      init_client_state=init_client_state,
      client_init=client_init,
      client_grad=client_grad,
      client_final=client_final,
      server_update=server_update,
      downlink=downlink,
      personal="head",
      local_update=local_update,
      plan_round=None if full else plan_round,
  )
