"""The tables and figures of experiments/RESULTS.md, one builder per kind of sweep.

A builder takes a sweep's records (:mod:`experiments.records`) and the folder
for figures, and returns ``{block name: Markdown}``; experiments.report writes
each block between its ``<!-- report:<name> -->`` markers in RESULTS.md. A
block links its figures as ``{FIGURES_LINK}/<file>.png``; the report puts in the
figures folder's path relative to RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Callable

from experiments.sections import channel, demo, fedsol, isr, personalized, zoo
from experiments.sections.common import FIGURES_LINK

__all__ = ["BUILDERS", "FIGURES_LINK"]

BUILDERS: dict[str, Callable[[list[dict], str], dict[str, str]]] = {
    "channel": channel.blocks,
    "demo": demo.blocks,
    "isr_gap": isr.gap_blocks,
    "isr_taps": isr.taps_blocks,
    "personalized": personalized.blocks,
    "fedsol": fedsol.blocks,
    "zoo": zoo.blocks,
}
