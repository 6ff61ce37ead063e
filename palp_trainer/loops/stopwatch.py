"""Seconds per phase of a trial: where its wall time goes besides the training steps (benchmarks/sweep_bench.py)."""

import os
import time
from collections import defaultdict
from contextlib import contextmanager


class Stopwatch:
    """`with watch("base"): ...` adds the block's seconds to that phase; `metrics()` gives them as the trial's
    `time/<phase>_s` metrics, with the wall-clock times the trial entered and left the loop (seconds since
    the epoch, comparable with the driver's `time/trial_start_unix` on one machine or NTP-synced nodes)."""

    def __init__(self):
        self.entered = time.time()
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        started = process_started()
        return {**{f"time/{phase}_s": s for phase, s in self.seconds.items()},
                **({"time/process_start_unix": started} if started else {}),
                "time/loop_entry_unix": self.entered, "time/loop_end_unix": time.time()}


def process_started() -> float | None:
    """When this process was started (seconds since the epoch; Linux's /proc, else None): a worker's process
    start to its loop entry is imports and Ray Train's set-up; before it, scheduling and process launch."""
    try:
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()  # after the command name
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
    except (OSError, ValueError, IndexError, StopIteration):
        return None
