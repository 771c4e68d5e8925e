"""Tap selection: explicit names and the ablation presets of OmniISR §4.4."""

import pytest

from isr_jax.errors import ConfigError
from isr_jax.taps import default_tap_count, make_isr_spec, select_taps

TAPS = tuple(f"t{i}" for i in range(10))  # e.g. ResNet-18: stem, 8 blocks, features


@pytest.mark.parametrize(
    "count,spacing,placement,expected",
    [
        (1, 1, "input", ("t0",)),
        (1, 1, "output", ("t9",)),
        (1, 1, "middle", ("t4",)),
        (3, 1, "input", ("t0", "t1", "t2")),
        (3, 2, "input", ("t0", "t2", "t4")),
        (3, 3, "input", ("t0", "t3", "t6")),
        (3, 2, "output", ("t5", "t7", "t9")),
        (3, 2, "middle", ("t2", "t4", "t6")),
        (2, 3, "middle", ("t3", "t6")),
        (5, 2, "input", ("t0", "t2", "t4", "t6", "t8")),
        (5, 2, "output", ("t1", "t3", "t5", "t7", "t9")),
    ],
)
def test_presets(count, spacing, placement, expected):
  assert select_taps(TAPS, count=count, spacing=spacing, placement=placement) == expected


def test_default_count_is_log_depth():
  assert default_tap_count(10) == 3
  assert default_tap_count(2) == 1
  assert len(select_taps(TAPS)) == 3


def test_explicit_names_are_returned_in_block_order():
  assert select_taps(TAPS, names=("t7", "t2")) == ("t2", "t7")


def test_unknown_tap_name_lists_available():
  with pytest.raises(ConfigError, match=r"isr\.taps.*'zz'.*t0"):
    select_taps(TAPS, names=("zz",))


def test_more_taps_than_model_has():
  with pytest.raises(ConfigError, match=r"isr\.num_taps=5 with isr\.spacing=3 spans 13"):
    select_taps(TAPS, count=5, spacing=3)
  with pytest.raises(ConfigError, match="num_taps=4"):
    select_taps(TAPS[:3], count=4)


def test_bad_placement_and_spacing():
  with pytest.raises(ConfigError, match=r"isr\.placement='top' is not one of"):
    select_taps(TAPS, count=1, placement="top")
  with pytest.raises(ConfigError, match=r"isr\.spacing=0"):
    select_taps(TAPS, count=1, spacing=0)


def test_spec_weights_per_tap_and_validation():
  spec = make_isr_spec(TAPS, enabled=True, num_taps=2, spacing=2, mi_weight=(0.1, 0.2),
                       ne_weight=0.05)
  assert spec.tap_names == ("t0", "t2")
  assert [t.mi_weight for t in spec.terms] == [0.1, 0.2]
  assert [t.ne_weight for t in spec.terms] == [0.05, 0.05]
  assert make_isr_spec(TAPS, enabled=False) is None
  with pytest.raises(ConfigError, match=r"isr\.mi_weight=-0\.1 must be"):
    make_isr_spec(TAPS, enabled=True, num_taps=1, mi_weight=-0.1)
  with pytest.raises(ConfigError, match=r"isr\.ne_weight=-1"):
    make_isr_spec(TAPS, enabled=True, num_taps=1, ne_weight=-1)
  with pytest.raises(ConfigError, match=r"isr\.mi_weight has 3 values but 2 taps"):
    make_isr_spec(TAPS, enabled=True, num_taps=2, mi_weight=(1, 2, 3))
  only_ne = make_isr_spec(TAPS, enabled=True, num_taps=2, mi_weight=0.0, ne_weight=0.1)
  assert only_ne.adapter_taps == ()
