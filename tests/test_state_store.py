"""Per-client state stores: host and file rows agree, restore exactly, and survive kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from isr_jax.errors import ConfigError, WorkdirError
from isr_jax.fl.file_store import FileStateStore
from isr_jax.fl.state_store import (
    HostStateStore,
    choose_store,
    host_memory_budget,
    row_template_of,
)

REPO = Path(__file__).resolve().parents[1]
N = 40


def init_rows(ids: np.ndarray) -> dict:
  """Deterministic initial rows: a nested pytree of float32 and int32 leaves."""
  ids = np.asarray(ids, np.int64)
  return {
      "alg": {"count": (ids * 7).astype(np.int32)[:, None].repeat(3, axis=1)},
      "personal": {"model": {"head": {
          "kernel": (ids[:, None, None] + np.arange(12, dtype=np.float32).reshape(1, 4, 3)
                     ).astype(np.float32),
          "bias": (ids[:, None] * 0.5).astype(np.float32).repeat(3, axis=1)}}},
  }


TEMPLATE = row_template_of(init_rows(np.arange(1)))


def random_rows(rng: np.random.Generator, k: int) -> dict:
  return jax.tree.map(
      lambda s: (rng.normal(size=(k, *s.shape)).astype(s.dtype) if s.dtype == np.float32
                 else rng.integers(-1000, 1000, size=(k, *s.shape)).astype(s.dtype)), TEMPLATE)


def assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def set_rows(dense: dict, ids: np.ndarray, rows: dict) -> None:
  """What scatter does, on the dense reference (ids >= 0 only, last duplicate wins)."""
  for i, c in enumerate(ids.tolist()):
    if c >= 0:
      jax.tree.map(lambda d, r, i=i, c=c: d.__setitem__(c, r[i]), dense, rows)


def make_file_store(path, **kw) -> FileStateStore:
  return FileStateStore(path, init_rows, TEMPLATE, N, **kw)


@pytest.mark.parametrize("kind", ["host", "file"])
def test_gather_scatter_round_trip(kind, tmp_path):
  store = (HostStateStore(init_rows(np.arange(N))) if kind == "host"
           else make_file_store(tmp_path / "s"))
  with store:
    assert store.num_clients == N
    assert store.nbytes_dense == N * (3 * 4 + 12 * 4 + 3 * 4)
    ids = np.array([5, 3, -1, 17])
    assert_tree_equal(store.gather(ids), init_rows(np.array([5, 3, 0, 17])))
    rng = np.random.default_rng(0)
    rows = random_rows(rng, 4)
    store.scatter(ids, rows, step=1)
    got = store.gather(np.array([17, -1, 5, 3, 9]))
    want = init_rows(np.array([17, 0, 5, 3, 9]))
    set_rows(want, np.array([0, -1, 2, 3]), jax.tree.map(lambda r: r[[3, 2, 0, 1]], rows))
    assert_tree_equal(got, want)
    # The padding row (-1) was not written: client 0 is still its initial row.
    assert_tree_equal(store.gather(np.array([0])), init_rows(np.array([0])))


def test_host_and_file_agree_and_restore_every_kept_step(tmp_path):
  rng = np.random.default_rng(1)
  host = HostStateStore(init_rows(np.arange(N)))
  file = make_file_store(tmp_path / "s", cache_bytes=10 * 1024)  # a cache smaller than N rows
  dense = init_rows(np.arange(N))
  snapshots = {0: jax.tree.map(np.copy, dense)}
  committed: list[int] = []
  for t in range(1, 13):
    k = int(rng.integers(1, 12))
    ids = rng.choice(N, size=k, replace=False)
    ids[rng.random(k) < 0.2] = -1
    assert_tree_equal(host.gather(ids), file.gather(ids))
    rows = random_rows(rng, k)
    host.scatter(ids, rows, t)
    file.scatter(ids, rows, t)
    set_rows(dense, ids, rows)
    if t % 3 == 0:
      committed.append(t)
      snapshots[t] = jax.tree.map(np.copy, dense)
      keep = committed[-2:]
      host.commit(t, keep)
      file.commit(t, keep)
  everyone = np.arange(N)
  assert_tree_equal(host.gather(everyone), dense)
  assert_tree_equal(file.gather(everyone), dense)
  assert host.nbytes_history < host.nbytes_dense
  # Newest kept step first, then the older one: both stores land exactly on the snapshot.
  for step in [12, 9]:
    for store in (host, file):
      store.restore(step)
      assert_tree_equal(store.gather(everyone), snapshots[step])
  # Steps a commit reclaimed are refused, not silently wrong.
  with pytest.raises(WorkdirError, match="step 3"):
    host.restore(3)
  # The initial state is always recomputable on disk.
  file.restore(0)
  assert_tree_equal(file.gather(everyone), snapshots[0])
  assert not list((tmp_path / "s" / "rows").rglob("*.row"))


def test_reopened_file_store_restores_last_commit(tmp_path):
  """The kill -9 path in process: writes after the last commit, a new store object, restore."""
  rng = np.random.default_rng(2)
  store = make_file_store(tmp_path / "s")
  dense = init_rows(np.arange(N))
  for t in range(1, 8):
    ids = rng.choice(N, size=8, replace=False)
    rows = random_rows(rng, 8)
    store.scatter(ids, rows, t)
    set_rows(dense, ids, rows)
    if t == 4:
      store.commit(4, [4])
      at_4 = jax.tree.map(np.copy, dense)
  # A killed writer's temporary file is ignored and removed on open.
  stray = store.path(3, 9).with_name("3.9.row.tmp123")
  stray.write_bytes(b"partial")
  del store  # no close: as if killed
  reopened = make_file_store(tmp_path / "s")
  assert not stray.exists()
  assert_tree_equal(reopened.gather(np.arange(N)), dense)  # before restore: the newest rows
  reopened.restore(4)
  assert_tree_equal(reopened.gather(np.arange(N)), at_4)
  assert all(v <= 4 for c in range(N) for v in reopened.versions(c))
  # Rounds after the checkpoint are rerun on top of it.
  reopened.scatter(np.array([1]), random_rows(rng, 1), 5)


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from isr_jax.fl.file_store import FileStateStore
    from tests.test_state_store import TEMPLATE, init_rows, kill_test_ids, kill_test_rows

    store = FileStateStore(sys.argv[1], init_rows, TEMPLATE, 40)
    committed = []
    for t in range(1, 100000):
      ids = kill_test_ids(t)
      store.scatter(ids, kill_test_rows(ids, t), t)
      if t % 2 == 0:
        # The checkpoint of round t is durable (the parent's record), then the store commits.
        print(t, flush=True)
        committed.append(t)
        store.commit(t, committed[-2:])
""")


def kill_test_ids(t: int) -> np.ndarray:
  return np.random.default_rng(t).choice(N, size=6, replace=False)


def kill_test_rows(ids: np.ndarray, t: int) -> dict:
  """Rows that are a deterministic function of (client, step)."""
  rows = init_rows(ids)
  return jax.tree.map(lambda x: (x * 3 + t).astype(x.dtype), rows)


def expected_at(step: int) -> dict:
  dense = init_rows(np.arange(N))
  for t in range(1, step + 1):
    ids = kill_test_ids(t)
    set_rows(dense, ids, kill_test_rows(ids, t))
  return dense


def test_kill_9_then_resume_from_last_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "s")], cwd=REPO,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  printed = []
  try:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      line = child.stdout.readline()
      if not line:
        break
      printed.append(int(line))
      if printed[-1] >= 4:
        # Let it run a little into later rounds, so the kill lands mid-write.
        time.sleep(0.05)
        break
    child.send_signal(signal.SIGKILL)
    rest, err = child.communicate(timeout=30)
  finally:
    if child.poll() is None:
      child.kill()
  printed += [int(x) for x in rest.split()]
  assert printed and printed[-1] >= 4, err
  assert child.returncode == -signal.SIGKILL
  last = printed[-1]
  store = make_file_store(tmp_path / "s")
  store.restore(last)
  assert_tree_equal(store.gather(np.arange(N)), expected_at(last))


def test_lazy_init_writes_nothing(tmp_path):
  rows = {"w": jax.ShapeDtypeStruct((256, 1024), np.float32)}  # 1 MiB a client
  init = lambda ids: {"w": np.broadcast_to(
      np.asarray(ids, np.float32)[:, None, None], (len(ids), 256, 1024)).copy()}
  store = FileStateStore(tmp_path / "s", init, rows, 1000)
  assert store.nbytes_dense == 1000 << 20
  got = store.gather(np.array([999, 0, 500]))
  np.testing.assert_array_equal(got["w"][:, 0, 0], [999, 0, 500])
  size = sum(p.stat().st_size for p in (tmp_path / "s").rglob("*") if p.is_file())
  assert size == 0
  assert store.disk_bytes() == 0


def test_commit_reclaims_old_versions(tmp_path):
  rng = np.random.default_rng(3)
  store = make_file_store(tmp_path / "s", fsync=False)
  for t in range(1, 31):
    ids = rng.choice(N, size=10, replace=False)
    store.scatter(ids, random_rows(rng, 10), t)
    store.commit(t, [t])
  per_client: dict[str, int] = {}
  for p in (tmp_path / "s" / "rows").rglob("*.row"):
    client = p.name.split(".")[0]
    per_client[client] = per_client.get(client, 0) + 1
  assert per_client and max(per_client.values()) <= 2


def test_truncated_row_file_names_the_file(tmp_path):
  store = make_file_store(tmp_path / "s")
  store.scatter(np.array([7]), random_rows(np.random.default_rng(4), 1), 1)
  store.commit(1, [1])
  path = store.path(7, 1)
  path.write_bytes(path.read_bytes()[:-5])
  reopened = make_file_store(tmp_path / "s")
  reopened.restore(1)
  with pytest.raises(WorkdirError, match=str(path)) as e:
    reopened.gather(np.array([7]))
  assert "cannot be resumed" in str(e.value)
  assert "\n" not in str(e.value)


def test_choose_store():
  assert choose_store("auto", 10, 100) == "host"
  assert choose_store("auto", 1000, 100) == "file"
  assert choose_store("host", 1000, 100) == "host"
  assert choose_store("file", 10, 100) == "file"
  with pytest.raises(ConfigError, match="fl.population.client_states"):
    choose_store("disk", 10, 100)
  assert host_memory_budget() > 0
