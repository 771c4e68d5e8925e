r"""Rebuilds every generated table and figure of experiments/RESULTS.md from run records.

  python -m experiments.report                       # from experiments/results/*.jsonl
  python -m experiments.report --workdirs=runs/isr_gap,runs/fedaims --save
  python -m experiments.report --check               # exit 1 if RESULTS.md is stale
  python -m experiments.report --workdirs=runs/paper/fedsol --standalone --out=runs/paper/R.md

Records come from the committed ``experiments/results/<sweep>.jsonl`` files, or
from sweep workdirs (``--workdirs``: each is collected afresh; ``--save`` then
writes its records to ``experiments/results/<sweep>.jsonl`` for committing).
Each sweep's records go to the section builder its sweep file names
(:mod:`experiments.sections`), which returns Markdown blocks; each block
replaces what stands between ``<!-- report:<name> -->`` and
``<!-- /report:<name> -->`` in RESULTS.md. Text outside the markers is prose
and is left alone, so no number inside a block is ever typed by hand.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections import defaultdict

from absl import app, flags

from experiments.common_flags import OUT, WORKDIRS
from experiments.records import read_records, write_records
from experiments.sections import BUILDERS, FIGURES_LINK

RESULTS_DIR = "experiments/results"

_RESULTS = flags.DEFINE_list("results", None,
                             f"results.jsonl files (default: {RESULTS_DIR}/*.jsonl).")
RESULTS_MD = "experiments/RESULTS.md"
_FIGURES = flags.DEFINE_string("figures", "experiments/figures", "Where figures are written.")
_SAVE = flags.DEFINE_bool("save", False,
                          f"Write the --workdirs' records to {RESULTS_DIR}/<sweep>.jsonl.")
_CHECK = flags.DEFINE_bool("check", False, "Change nothing; exit 1 if a block would change.")
_STANDALONE = flags.DEFINE_bool(
    "standalone", False, "Write every block, each under a heading, into a new --out file "
    "(a run's own report) instead of filling the markers of an existing one.")

_BLOCK = re.compile(
    r"(<!-- report:(?P<name>[\w/.-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.DOTALL)


def load(workdirs: list[str], results: list[str]) -> dict[str, list[dict]]:
  """``{sweep name: records}``; a workdir's records replace a file's of the same sweep."""
  by_sweep: dict[str, list[dict]] = defaultdict(list)
  for path in results:
    for r in read_records(path):
      by_sweep[r["sweep"]].append(r)
  fresh: dict[str, list[dict]] = defaultdict(list)
  for path in workdirs:
    for r in read_records(path):
      fresh[r["sweep"]].append(r)
  by_sweep.update(fresh)
  return dict(by_sweep)


def build_blocks(by_sweep: dict[str, list[dict]], figures: str) -> dict[str, str]:
  """Every block of every sweep whose report kind has a builder."""
  blocks: dict[str, str] = {}
  for name, records in sorted(by_sweep.items()):
    kind = records[0].get("report", "")
    if kind not in BUILDERS:
      print(f"sweep {name}: no section builder for report kind {kind!r}; skipped",
            file=sys.stderr)
      continue
    blocks.update(BUILDERS[kind](records, figures))
  return blocks


def fill(text: str, blocks: dict[str, str]) -> tuple[str, list[str], list[str]]:
  """``(new text, blocks replaced, blocks with no marker)``."""
  used = []

  def replace(m: re.Match) -> str:
    name = m.group("name")
    if name not in blocks:
      return m.group(0)
    used.append(name)
    return f"{m.group(1)}{blocks[name].rstrip()}\n{m.group(4)}"

  new = _BLOCK.sub(replace, text)
  return new, used, sorted(set(blocks) - set(used))


def main(argv):
  out_path = OUT.value or RESULTS_MD
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  results = (_RESULTS.value if _RESULTS.value is not None
             else sorted(glob.glob(os.path.join(RESULTS_DIR, "*.jsonl"))))
  try:
    by_sweep = load(WORKDIRS.value, results)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  if _SAVE.value:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    for path in WORKDIRS.value:
      records = read_records(path)
      if records:
        out = os.path.join(RESULTS_DIR, f"{records[0]['sweep']}.jsonl")
        write_records(records, out)
        print(f"records of {path}: {out}")
  if _STANDALONE.value:
    link = os.path.relpath(_FIGURES.value, os.path.dirname(os.path.abspath(out_path)))
    blocks = build_blocks(by_sweep, _FIGURES.value)
    with open(out_path, "w") as f:
      f.write("# Results\n\nWritten by `python -m experiments.report --standalone`.\n")
      for name, body in blocks.items():
        f.write(f"\n## {name}\n\n{body.replace(FIGURES_LINK, link).rstrip()}\n")
    print(f"{out_path}: {len(blocks)} blocks; figures in {_FIGURES.value}")
    return
  if not os.path.exists(out_path):
    sys.exit(f"error: {out_path}: no such file (it holds the prose and the block markers)")
  with open(out_path) as f:
    text = f.read()
  figures = _FIGURES.value
  if _CHECK.value:  # figures go to a scratch folder: --check changes nothing
    import tempfile
    figures = tempfile.mkdtemp(prefix="report_check_")
  link = os.path.relpath(_FIGURES.value, os.path.dirname(os.path.abspath(out_path)))
  blocks = {k: v.replace(FIGURES_LINK, link)
            for k, v in build_blocks(by_sweep, figures).items()}
  new, used, unplaced = fill(text, blocks)
  for name in unplaced:
    print(f"block {name!r} has no <!-- report:{name} --> marker in {out_path}",
          file=sys.stderr)
  empty = sorted(set(m.group("name") for m in _BLOCK.finditer(text)) - set(used))
  for name in empty:
    print(f"marker <!-- report:{name} --> in {out_path}: no records make that block",
          file=sys.stderr)
  if _CHECK.value:
    if new != text:
      sys.exit(f"error: {out_path} is stale: run python -m experiments.report")
    if empty:
      sys.exit(f"error: {out_path} has {len(empty)} markers that no records fill "
               f"({', '.join(empty)}): commit the sweeps' records in {RESULTS_DIR}/")
    print(f"{out_path} is up to date ({len(used)} blocks)")
    return
  with open(out_path, "w") as f:
    f.write(new)
  print(f"{out_path}: {len(used)} blocks rebuilt from {sum(map(len, by_sweep.values()))} "
        f"records; figures in {figures}")


if __name__ == "__main__":
  app.run(main)
