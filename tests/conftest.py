"""Shared fixtures, and one XLA compilation cache for the whole suite."""

import os
import shutil
import tempfile

import jax
import pytest
import tensorflow_datasets as tfds

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
  """Shares compiled XLA programs between tests, xdist workers and subprocesses.

  Most of the suite's time is XLA compiling the same small programs again: every
  worker and every ``python -m`` subprocess compiles the same eager primitives,
  the same digits LeNet-5 steps, the same resumed run. JAX's persistent cache
  (keyed by the program, its compile options and the backend) turns those into
  reads. The directory is made by the first process (the controller under xdist,
  whose environment the workers and subprocesses inherit) and removed with it,
  so nothing outlives the run and a user's own cache setting is left alone.
  """
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="isr_jax_test_xla_cache_")
    config._isr_jax_owned_cache = os.environ[_CACHE_ENV]
  # Tiny programs too: the suite is mostly tiny programs.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                    int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))


def pytest_unconfigure(config):
  owned = getattr(config, "_isr_jax_owned_cache", None)
  if owned:
    shutil.rmtree(owned, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _tfds_temp_dirs_under_pytest(tmp_path_factory):
  """Keeps the directories tfds leaks inside pytest's temporary tree.

  Every ``tfds.builder`` made where no prepared data exists (``mock_data``, the
  missing-data error) calls ``DatasetInfo.initialize_from_bucket``, which makes a
  ``tempfile.mkdtemp("tfds")`` and never removes it: a suite run used to leave a
  few dozen empty ``/tmp/tmp*tfds`` directories. pytest prunes its own tree.
  """
  previous = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = previous


@pytest.fixture(autouse=True)
def _no_learning_curve_figures(request, monkeypatch):
  """Runs trained in this process draw no ``learning_curves.png``, except under
  ``@pytest.mark.figures``.

  Drawing the figure is about a second of matplotlib at the end of every
  ``train_and_evaluate`` (layout and PNG encoding), and the suite trains about a
  hundred runs in-process; the tests marked ``figures`` check the figure, and the
  drivers run in subprocesses still draw theirs.
  """
  if request.node.get_closest_marker("figures") is None:
    monkeypatch.setattr("isr_jax.train._plot", lambda workdir: None)


@pytest.fixture
def mock_tfds(monkeypatch):
  """``tfds.testing.mock_data`` with a repaired batched read; no TensorFlow needed.

  tfds 4.9.10's mock installs ``functools.partial(_getitems, generator=...)`` as a
  plain attribute of a MagicMock, so ``source.__getitems__(keys)`` never receives
  ``self`` and fails with ``missing 1 required positional argument``. The
  replacement takes the keys from whichever position they arrive in.
  """
  from tensorflow_datasets.testing import mocking

  def getitems(*args, generator, serialized=False):
    assert not serialized
    return [generator[key] for key in args[-1]]

  monkeypatch.setattr(mocking, "_getitems", getitems)

  def mock(num_examples):
    return tfds.testing.mock_data(
        num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
    )

  return mock
