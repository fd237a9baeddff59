"""What bounds the command's memory: the anonymous (heap) peak, apart from mapped source files.

safetensors maps the source shards, so the process's RSS also counts file pages the kernel can drop at
any time; ``--batch-size`` bounds the heap only.  A sampler thread reads /proc/self/status.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class MemoryPeak:
    """Peaks (bytes) of anonymous memory and of resident file-backed memory, sampled while running."""

    anonymous: int = 0
    file_backed: int = 0
    samples: int = 0


def resident() -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of this process: RssAnon, and RssFile + RssShmem (a source
    on tmpfs maps as shared memory); None where /proc does not report them."""
    values = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    values[key] = int(rest.split()[0]) * 1024  # reported in kB
    except OSError:
        return None
    if len(values) != 3:
        return None
    return values["RssAnon"], values["RssFile"] + values["RssShmem"]


class MemorySampler:
    """``with MemorySampler() as peak:`` fills ``peak`` every ``interval_s`` seconds and at both ends."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak = MemoryPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moeq-memory-sampler", daemon=True)

    def sample(self) -> None:
        now = resident()
        if now is not None:
            self.peak.anonymous = max(self.peak.anonymous, now[0])
            self.peak.file_backed = max(self.peak.file_backed, now[1])
            self.peak.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemoryPeak:
        self.sample()
        self._thread.start()
        return self.peak

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
