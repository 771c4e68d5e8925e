"""Flags that several commands of experiments/ take, each defined once.

absl refuses a flag defined by two modules in one process, and the tests (and a
notebook) import several commands at once; so a flag every command means the
same by lives here, and each command reads the default it documents when the
flag is left unset.
"""

from absl import flags

WORKDIR = flags.DEFINE_string(
    "workdir", None, "The parent of every run's workdir (each command says its default).")
WORKDIRS = flags.DEFINE_list(
    "workdirs", [], "Run workdirs, or sweep workdirs standing for their runs (also as "
    "arguments where a command takes run workdirs).")
SEEDS = flags.DEFINE_list("seeds", None, "Seeds (each command says its default).")
EXAMPLES = flags.DEFINE_integer(
    "examples", 1000, "Training examples a measurement averages over (all if fewer).")
BATCH = flags.DEFINE_integer("batch", 500, "Examples per forward pass of a measurement.")
SEED = flags.DEFINE_integer("seed", 0, "Seed of a measurement's examples (and its draws).")
REDO = flags.DEFINE_bool("redo", False, "Measure again a run that has its measurement file.")
OUT = flags.DEFINE_string("out", None, "The file a command writes (each command says its default).")
