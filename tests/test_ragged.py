"""Tests of isr_jax.data.ragged: bit-identical rows to pack_clients, memory, gather cost."""

import tracemalloc

import numpy as np
import pytest

from isr_jax.data.packing import ClientData, pack_clients
from isr_jax.data.ragged import (
    RaggedClients,
    as_ragged,
    gather_rows,
    pack_from_ragged,
    ragged_clients,
)
from isr_jax.errors import ConfigError

B = 4


def _assert_rows_equal(got: ClientData, want: ClientData):
  for name in ClientData._fields:
    g, w = getattr(got, name), getattr(want, name)
    assert g.dtype == w.dtype, name
    assert g.shape == w.shape, name
    np.testing.assert_array_equal(g, w, err_msg=name)
    # Bit for bit, not merely equal values (-0.0 == 0.0, NaN payloads).
    assert g.tobytes() == w.tobytes(), name


def _padding_row(dense: ClientData) -> ClientData:
  """What gather_rows must give for id -1: one empty client shaped like dense's rows."""
  return ClientData(*(np.zeros_like(a[:1]) for a in dense))


def _expected(dense: ClientData, ids) -> ClientData:
  """pack_clients rows [ids], with an all-zero empty client where an id is -1."""
  pad = _padding_row(dense)
  if not len(ids):
    return ClientData(*(a[:0] for a in dense))
  return ClientData(*(
      np.concatenate([pad_a if i < 0 else a[i:i + 1] for i in ids])
      for a, pad_a in zip(dense, pad, strict=True)
  ))


def _uneven_indices(n, rng):
  """Clients of B examples, of 1 example, one larger than the rest, and random sizes."""
  sizes = [B, 1, 3 * B + 3, 5, 2, B + 1, 7, 1, 9]
  assert sum(sizes) <= n
  perm = rng.permutation(n)
  bounds = np.cumsum([0, *sizes])
  return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


@pytest.fixture
def image_data():
  rng = np.random.default_rng(0)
  n = 60
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  x[0, 0, 0, 0] = -0.0
  x[1, 0, 0, 0] = np.nan
  y = rng.integers(0, 10, n).astype(np.int32)
  return x, y, _uneven_indices(n, rng)


@pytest.fixture
def seg_data():
  rng = np.random.default_rng(1)
  n = 50
  x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
  y = rng.integers(0, 12, (n, 4, 4)).astype(np.int32)
  return x, y, _uneven_indices(n, rng)


IDS = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8],
    [8, 2, 0, 5],
    [3, -1, 1, 2, -1],
    [-1, -1],
    [2],
    [],
]


@pytest.mark.parametrize("data", ["image_data", "seg_data"])
@pytest.mark.parametrize("ids", IDS)
def test_gather_rows_equals_pack_clients_rows(data, ids, request):
  x, y, parts = request.getfixturevalue(data)
  dense = pack_clients(x, y, parts, B)
  store = ragged_clients(x, y, parts, B)
  assert store.steps_per_epoch == dense.steps_per_epoch
  assert store.batch_size == dense.batch_size == B
  _assert_rows_equal(gather_rows(store, np.array(ids, np.int64)), _expected(dense, ids))


def test_store_layout(image_data):
  x, y, parts = image_data
  store = ragged_clients(x, y, parts, B)
  assert store.offsets.dtype == np.int64
  assert store.num_clients == len(parts)
  np.testing.assert_array_equal(store.num_examples, [len(p) for p in parts])
  assert store.num_examples.dtype == np.int32
  for c, ix in enumerate(parts):
    a, b = store.offsets[c], store.offsets[c + 1]
    assert store.x[a:b].tobytes() == x[ix].tobytes()
    np.testing.assert_array_equal(store.y[a:b], y[ix])


def test_gather_rows_accepts_any_integer_dtype(image_data):
  x, y, parts = image_data
  dense = pack_clients(x, y, parts, B)
  store = ragged_clients(x, y, parts, B)
  want = _expected(dense, [4, -1, 0])
  for dtype in (np.int32, np.int64, np.int16):
    _assert_rows_equal(gather_rows(store, np.array([4, -1, 0], dtype)), want)


@pytest.mark.parametrize("ids", [[9], [-2], [0.0, 1.0], [[0, 1]]])
def test_bad_ids_raise_one_line_config_error(image_data, ids):
  x, y, parts = image_data
  store = ragged_clients(x, y, parts, B)
  with pytest.raises(ConfigError, match=r"^ids: ") as err:
    gather_rows(store, np.array(ids))
  assert "\n" not in str(err.value)


def test_pack_from_ragged_equals_pack_clients(seg_data):
  x, y, parts = seg_data
  _assert_rows_equal(pack_from_ragged(ragged_clients(x, y, parts, B)), pack_clients(x, y, parts, B))


@pytest.mark.parametrize("data", ["image_data", "seg_data"])
def test_as_ragged_round_trip(data, request):
  x, y, parts = request.getfixturevalue(data)
  dense = pack_clients(x, y, parts, B)
  store = as_ragged(dense)
  direct = ragged_clients(x, y, parts, B)
  for name in RaggedClients._fields:
    assert np.asarray(getattr(store, name)).tobytes() == np.asarray(getattr(direct, name)).tobytes()
  _assert_rows_equal(pack_from_ragged(store), dense)
  _assert_rows_equal(gather_rows(store, np.array([5, -1, 2])), _expected(dense, [5, -1, 2]))


def test_as_ragged_rejects_a_mask_with_holes(image_data):
  x, y, parts = image_data
  dense = pack_clients(x, y, parts, B)
  mask = dense.mask.copy()
  mask[0, 0, 0] = False
  with pytest.raises(ConfigError, match="data.mask"):
    as_ragged(dense._replace(mask=mask))


def test_allow_empty_gives_empty_rows():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(20, 3)).astype(np.float32)
  y = rng.integers(0, 5, 20).astype(np.int32)
  parts = [np.arange(0, 6), np.array([], np.int64), [], np.arange(6, 9), np.array([], int)]
  dense = pack_clients(x, y, [np.asarray(p, np.int64) for p in parts], B, allow_empty=True)
  store = ragged_clients(x, y, parts, B, allow_empty=True)
  got = pack_from_ragged(store)
  _assert_rows_equal(got, dense)
  for c in (1, 2, 4):
    assert got.num_examples[c] == 0
    assert not got.mask[c].any()
    assert not got.x[c].any() and not got.y[c].any()
  assert store.x.shape == (9, 3)


def test_all_clients_empty_with_allow_empty():
  x = np.ones((5, 2), np.float32)
  y = np.ones(5, np.int32)
  parts = [np.array([], np.int64)] * 3
  store = ragged_clients(x, y, parts, B, allow_empty=True)
  _assert_rows_equal(pack_from_ragged(store), pack_clients(x, y, parts, B, allow_empty=True))


def _message(fn, *args, **kwargs):
  with pytest.raises(ConfigError) as err:
    fn(*args, **kwargs)
  return str(err.value)


@pytest.mark.parametrize(
    ("parts", "batch_size"),
    [
        ([np.arange(3), np.array([], np.int64), np.array([], np.int64)], B),  # Empty clients.
        ([], B),  # No clients.
        ([np.arange(3)], 0),  # batch_size < 1.
        ([np.arange(3)], -2),
    ],
)
def test_errors_match_pack_clients(parts, batch_size):
  x = np.zeros((5, 2), np.float32)
  y = np.zeros(5, np.int32)
  want = _message(pack_clients, x, y, parts, batch_size)
  got = _message(ragged_clients, x, y, parts, batch_size)
  assert got == want
  assert "\n" not in got


def test_dense_nbytes_is_what_pack_clients_holds(image_data, seg_data):
  for x, y, parts in (image_data, seg_data):
    dense = pack_clients(x, y, parts, B)
    store = ragged_clients(x, y, parts, B)
    assert store.dense_nbytes == sum(a.nbytes for a in dense)


def test_power_law_population_memory():
  """Ragged memory is the examples' bytes; dense memory is clients x largest client."""
  rng = np.random.default_rng(3)
  num_clients = 2000
  sizes = np.minimum(np.ceil(20 * (1 + rng.pareto(1.5, num_clients))).astype(np.int64), 1000)
  median = int(np.median(sizes))
  sizes[rng.choice(num_clients, 3, replace=False)] = 100 * median  # A few giant clients.
  n = int(sizes.sum())
  x = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  y = rng.integers(0, 10, n).astype(np.int32)
  parts = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
  batch = 32
  store = ragged_clients(x, y, parts, batch)

  examples_nbytes = x.nbytes + y.nbytes  # Every example once (the parts cover x exactly).
  assert store.nbytes == examples_nbytes + 8 * (num_clients + 1)
  assert store.nbytes <= 1.01 * examples_nbytes

  # pack_clients would hold C*S*B slots of (64 + 4 + 1) bytes, S from the largest client.
  steps = -(-int(sizes.max()) // batch)
  dense = num_clients * steps * batch * (4 * 4 * 4 + 4 + 1) + 4 * num_clients
  assert store.steps_per_epoch == steps
  assert store.dense_nbytes == dense
  ratio = store.dense_nbytes / store.nbytes
  assert ratio > 10, ratio

  # Spot-check rows against pack_clients of just those clients (plus a giant one,
  # so that S matches the whole population's).
  giant = int(np.argmax(sizes))
  ids = np.array([giant, 7, -1, 1999, 3])
  sub = pack_clients(x, y, [parts[i] for i in ids if i >= 0], batch)
  sub_ids = [0, 1, -1, 2, 3]
  _assert_rows_equal(gather_rows(store, ids), _expected(sub, sub_ids))


def test_gather_rows_cost_does_not_depend_on_population():
  rng = np.random.default_rng(4)
  num_clients = 100_000
  sizes = rng.integers(1, 9, num_clients)
  n = int(sizes.sum())
  x = rng.normal(size=(n, 2)).astype(np.float32)
  y = rng.integers(0, 3, n).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  # Contiguous parts: the store is x itself, and building it stays cheap.
  parts = [np.arange(a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
  store = ragged_clients(x, y, parts, B)
  ids = np.array([99_999, 5, -1, 50_000, 0, 12, 77_777, -1, 3, 42])

  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    rows = gather_rows(store, ids)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()

  returned = sum(a.nbytes for a in rows)
  # 64 KiB of slack rather than 1 MiB: even a one-byte-per-client temporary (100 KB,
  # e.g. a boolean over all clients) breaks this limit; gather_rows needs ~10 KB.
  limit = 5 * returned + 2**16
  assert peak < limit, (peak, returned)
  assert num_clients > limit
  for k, c in enumerate(ids):
    if c >= 0:
      np.testing.assert_array_equal(rows.x[k][rows.mask[k]], x[parts[c]])
      np.testing.assert_array_equal(rows.y[k][rows.mask[k]], y[parts[c]])
    else:
      assert not rows.mask[k].any()


def test_clients_already_in_order_share_the_arrays():
  """Examples stored client after client are the store: no second copy of the data."""
  x = np.arange(40, dtype=np.float32).reshape(20, 2)
  y = np.arange(20, dtype=np.int32)
  parts = [np.arange(0, 7), np.arange(7, 20)]
  store = ragged_clients(x, y, parts, 4)
  assert np.shares_memory(store.x, x) and np.shares_memory(store.y, y)
  shuffled = ragged_clients(x, y, [np.arange(7, 20), np.arange(0, 7)], 4)
  assert not np.shares_memory(shuffled.x, x)
  np.testing.assert_array_equal(gather_rows(store, np.array([1, 0])).x,
                                gather_rows(shuffled, np.array([0, 1])).x)
