"""Shared fixtures."""

import tempfile

import pytest
import tensorflow_datasets as tfds


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
