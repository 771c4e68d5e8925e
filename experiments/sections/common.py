"""What every section builder needs: selecting records, per-seed values, provenance, tables."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

from experiments.stats import Interval, mean_interval

# Stands for the figures folder in a block's links (experiments.report resolves it).
FIGURES_LINK = "{figures}"


def select(records: Iterable[dict], **labels: str) -> list[dict]:
  """The records whose labels include every ``name=value`` given."""
  return [r for r in records if all(r["labels"].get(k) == v for k, v in labels.items())]


def labels_of(records: Iterable[dict], name: str) -> list[str]:
  """The values of label ``name`` in first-seen order."""
  return list(dict.fromkeys(r["labels"][name] for r in records if name in r["labels"]))


def metric(record: dict, key: str, where: str = "final") -> float | None:
  """``record[where][key]`` as a float, None when absent or not finite."""
  value = record.get(where, {}).get(key)
  if value is None or not math.isfinite(float(value)):
    return None
  return float(value)


def by_seed(records: Iterable[dict], key: str, where: str = "final") -> dict[int, float]:
  """``{seed: value}`` over the finished runs that logged ``key``."""
  out = {}
  for r in records:
    if r["status"] != "done":
      continue
    value = metric(r, key, where)
    if value is not None:
      if r["seed"] in out:
        raise ValueError(f"two finished runs with seed {r['seed']} among {r['labels']}: "
                         "select one cell of the grid before pairing by seed")
      out[r["seed"]] = value
  return out


def interval(records: Iterable[dict], key: str, where: str = "final") -> Interval:
  return mean_interval(list(by_seed(records, key, where).values()))


def status_note(records: Sequence[dict]) -> str:
  """What is missing: `` (k diverged, m unfinished)`` or empty."""
  diverged = sum(r["status"] == "diverged" for r in records)
  unfinished = sum(r["status"] in ("partial", "missing") for r in records)
  parts = [f"{diverged} diverged"] * bool(diverged) + [f"{unfinished} unfinished"] * bool(
      unfinished)
  return f" ({', '.join(parts)})" if parts else ""


def provenance(records: Sequence[dict]) -> str:
  """One line: the command, the seeds, how many runs finished, when and on what machine."""
  commands = sorted({r.get("command", "") for r in records} - {""})
  seeds = sorted({r["seed"] for r in records})
  done = [r for r in records if r["status"] == "done"]
  machines = sorted({_machine(r["machine"]) for r in done if "machine" in r})
  dates = sorted({r["machine"]["date"][:10] for r in done if "machine" in r})
  when = (dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}") if dates else "–"
  return (f"`{'`; `'.join(commands)}` — seeds {', '.join(map(str, seeds))}; "
          f"{len(done)} of {len(records)} runs finished{status_note(records)}; "
          f"{when}; {'; '.join(machines) or 'machine not recorded'}.")


def _machine(info: Mapping) -> str:
  return f"{info.get('device', '?')} ({info.get('cores', '?')} cores), jax {info.get('jax', '?')}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines)


def percent(iv: Interval, signed: bool = False) -> str:
  return iv.format(scale=100.0, digits=2, signed=signed)


def curves_by_seed(records: Iterable[dict], key: str,
                   transform: Callable[[float], float] = float) -> list[list[tuple[int, float]]]:
  """Each finished run's ``[(round, value)]`` curve of ``key``."""
  out = []
  for r in records:
    if r["status"] != "done":
      continue
    points = [(p["round"], transform(p[key])) for p in r.get("curve", ())
              if p.get(key) is not None]
    if points:
      out.append(points)
  return out


def figure_link(path: str, caption: str) -> str:
  """A Markdown image of the figure written to ``path``."""
  return f"![{caption}]({FIGURES_LINK}/{os.path.basename(path)})"
