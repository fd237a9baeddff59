"""``python -m moeq_triton``: the command line as a module, which is what ``torchrun -m moeq_triton`` runs.

The console script ``moeq-triton`` calls the same ``cli.run``.  Ctrl-C / SIGTERM are taken over first
thing, before the command's own imports, so that even a signal during start-up ends in one line."""

import signal
import sys


def _starting(number: int, frame) -> None:
    what = "terminated (SIGTERM)" if number == signal.SIGTERM else "interrupted"
    print(f"moeq-triton: {what} while starting; nothing was written", file=sys.stderr)
    raise SystemExit(128 + number)


for _number in (signal.SIGINT, signal.SIGTERM):
    if signal.getsignal(_number) != signal.SIG_IGN:
        signal.signal(_number, _starting)
# a launcher may start the process with these blocked, so that one sent during Python's own start-up (before
# any line of ours can run) waits for the handlers above; delivered now, if pending
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

from moeq_triton.cli import run  # noqa: E402  (after the handlers: the import takes a moment)

run()
