"""``python -m moeq_triton``: the command line as a module, which is what ``torchrun -m moeq_triton`` runs.

The console script ``moeq-triton`` calls the same ``cli.run``."""

from moeq_triton.cli import run

run()
