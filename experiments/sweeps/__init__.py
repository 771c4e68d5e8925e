"""What a sweep is: named grids of runs, each a config file × labelled settings × seeds.

A sweep file (``experiments/sweeps/<name>.py``) defines ``get_sweep(arg) -> Sweep``
and opens with the command that runs it. A :class:`Grid` is the product of its
axes; every axis value is a label and the settings it overrides, so one value
may set several settings at once ("decoupled adapters at α = 0.1" sets
``isr.enabled``, ``isr.decouple_adapters`` and ``isr.mi_weight``). A sweep is a
union of grids, because the runs a question needs are rarely one product (the
CL reference does not depend on the FL partition).

Run names are the grid's name, the labels and the seed joined by ``-``; they
name the run's workdir, so a sweep started again finds its runs and resumes
them.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class Axis(NamedTuple):
  """One dimension of a grid: a column name and ``{label: {setting: value}}``."""

  name: str
  values: Mapping[str, Mapping[str, Any]]


class Grid(NamedTuple):
  """The runs ``config × axis_1 × … × axis_n × seeds``.

  Attributes:
    name: the grid's label (first part of every run name, the ``grid`` column).
    config: a config file and its argument, as ``--config`` takes it
      (``experiments/configs/isr_gap.py:fl,c2``).
    axes: the grid's dimensions.
    seeds: the seeds every cell runs with.
    settings: overrides applied to every run of the grid, before the axes'.
  """

  name: str
  config: str
  axes: Sequence[Axis] = ()
  seeds: Sequence[int] = (0,)
  settings: Mapping[str, Any] = {}


class Sweep(NamedTuple):
  """A named union of grids; ``report`` names the section builder of experiments.report."""

  name: str
  grids: Sequence[Grid]
  report: str = ""


class Run(NamedTuple):
  """One training run of a sweep.

  Attributes:
    name: ``<grid>-<label>-…-seed<k>``, also its workdir's name.
    config: the config file and argument.
    settings: every override, the grid's then the axes' in axis order.
    seed: ``config.seed``.
    labels: ``{"grid": grid name, <axis name>: label, …}``.
  """

  name: str
  config: str
  settings: Mapping[str, Any]
  seed: int
  labels: Mapping[str, str]


def axis(name: str, values: Mapping[str, Mapping[str, Any]] | None = None, *,
         setting: str | None = None, options: Sequence[Any] = ()) -> Axis:
  """An axis from labelled override sets, or from one ``setting`` over ``options``.

  ``axis("rho", setting="fl.fedsol.rho", options=(0.1, 0.5))`` labels its values
  by themselves (``0.1``, ``0.5``).
  """
  if (values is None) == (setting is None):
    raise ValueError("axis: give either labelled values or one setting with its options")
  if values is None:
    values = {_label(v): {setting: v} for v in options}
  if not values:
    raise ValueError(f"axis {name!r} has no values")
  for label in values:
    if not label or "-" in label or "/" in label:
      raise ValueError(f"axis {name!r}: label {label!r} must be non-empty, without '-' or '/'")
  return Axis(name, dict(values))


# ISR off and on, the second axis of the demo's and the zoo's grids.
ISR_OFF_ON = axis("isr", {"off": {"isr.enabled": False}, "on": {"isr.enabled": True}})


def _label(value: Any) -> str:
  text = str(value)
  return text.replace("-", "m").replace("/", "_")


def expand(sweep: Sweep, seeds: Sequence[int] | None = None) -> list[Run]:
  """Every run of ``sweep``, grid by grid, each seed's cells before the next seed's;
  duplicates (same name) once.

  Args:
    sweep: the sweep.
    seeds: replaces every grid's seeds when given.

  Raises:
    ValueError: two runs share a name but not their settings.
  """
  runs: dict[str, Run] = {}
  for grid in sweep.grids:
    names = [a.name for a in grid.axes]
    if len(set(names)) != len(names) or "grid" in names or "seed" in names:
      raise ValueError(f"grid {grid.name!r}: axis names {names} must be distinct and not "
                       "'grid' or 'seed'")
    cells = list(itertools.product(*(a.values.items() for a in grid.axes)))
    # Seed-major: a sweep stopped part-way has whole tables for its first seeds.
    for seed in (grid.seeds if seeds is None else seeds):
      for cell in cells:
        settings = dict(grid.settings)
        for _, overrides in cell:
          settings.update(overrides)
        labels = {"grid": grid.name, **{a.name: lab for a, (lab, _) in zip(grid.axes, cell,
                                                                            strict=True)}}
        name = "-".join([grid.name, *(lab for lab, _ in cell), f"seed{seed}"])
        run = Run(name, grid.config, settings, int(seed), labels)
        if name in runs and runs[name][1:3] != run[1:3]:
          raise ValueError(f"two runs are named {name!r} with different settings")
        runs.setdefault(name, run)
  return list(runs.values())
