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


# Tests `make test` (CI's suite, 2 cores, ~30 minutes) leaves out and `make test-all`
# runs, besides those marked ``slow`` where they are defined: each repeats, at the
# cost of compiling another round, what a test that stays in CI already checks.
SLOW_IN_CI = {
    # The launch script's tiny paper schedule: both tables end to end (its sweeps'
    # pieces are tested in test_sweep_report.py).
    "test_launch.py::test_paper_schedules_tiny_runs_both_tables_and_writes_one_report",
    # 1 vs 8 devices: the FL round stays (the hybrid round is the FL round plus a cloud
    # step, tested on one device in test_hybrid.py).
    "test_multidevice.py::test_same_result_on_1_and_8_devices[hybrid]",
    # One FL round with ISR per segmentation model: DeepLabv3+ stays; TopFormer's and
    # SeaFormer's forward passes and taps stay in test_seg_models.py.
    "test_seg_training.py::test_one_fl_round_per_model[topformer]",
    "test_seg_training.py::test_one_fl_round_per_model[seaformer]",
    # train_and_evaluate with each algorithm: FedAvg, SCAFFOLD, FedSoL and FedAIMS stay;
    # the others' rounds are checked in their own files and in test_algorithms.py.
    *(f"test_algorithms.py::test_one_round_on_digits[{name}-{isr}]" for name, isr in (
        ("fedadam", False), ("moon", False), ("local", True), ("fedper", True),
        ("fedrep", True), ("lg_fedavg", True), ("fedbabu", True), ("ditto", True),
        ("fedrod", True), ("fedala", True))),
    # FedALA's round 1 = FedAvg: its vmapped-vs-sequential test stays.
    "test_personalized_baselines.py::"
    "test_fedala_first_round_is_fedavg_and_eta_zero_keeps_the_global_model",
    # Messages summed client by client: FedAvg's stays (Ditto's own local update is
    # checked against a loop in test_personalized_baselines.py).
    "test_fl_round.py::test_messages_summed_as_clients_finish_equal_the_stacked_weighted_mean"
    "[ditto-vmap-0]",
    # FedSoL's first step per proximal source: FedProx's stays.
    "test_fedsol.py::test_jitted_first_step_of_every_proximal_source_is_its_base[feddyn]",
    "test_fedsol.py::test_jitted_first_step_of_every_proximal_source_is_its_base[moon]",
    # Drivers end to end: the diagnostics command over a sweep (its measurements are
    # tested in process), the personalized presets on mock TFDS data, two preset runs.
    "test_diagnostics.py::test_command_measures_the_finished_runs_of_a_sweep",
    "test_personalized_driver.py::test_paper_presets_build_on_tfds_mock_data",
    "test_personalized_parts.py::test_personalized_preset_local_variant_runs_two_rounds",
}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    node = item.nodeid.split("tests/", 1)[-1]
    if node in SLOW_IN_CI or node.split("[", 1)[0] in SLOW_IN_CI:
      item.add_marker(pytest.mark.slow)
