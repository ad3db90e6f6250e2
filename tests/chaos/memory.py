"""Resident memory of each process of the system, with its children, sampled over time."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")


def children(pid: int) -> list[int]:
    """Direct children of a process, from every one of its threads (Linux only)."""
    found: list[int] = []
    for task in PROC.glob(f"{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found.extend(int(child) for child in task.read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    pending, seen = [pid], []
    while pending:
        current = pending.pop()
        seen.append(current)
        pending.extend(children(current))
    return seen


def rss_bytes(pid: int) -> int:
    """VmRSS of one process; 0 when it is gone (it may exit between listing and reading)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(pid: int) -> int:
    return sum(rss_bytes(member) for member in descendants(pid))


@dataclass
class MemorySampler:
    """Every `interval` seconds, the RSS of each named process tree (pid None: not running)."""

    pids: Callable[[], dict[str, int | None]]
    interval: float = 2.0
    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {name: tree_rss(pid) for name, pid in self.pids().items() if pid is not None}
            self.samples.append((time.time(), sample))
            self._stop.wait(self.interval)

    def summary(self) -> dict[str, dict[str, float]]:
        """Start, end and peak RSS per process name, in MiB."""
        series: dict[str, list[int]] = {}
        for _, sample in self.samples:
            for name, value in sample.items():
                if value:
                    series.setdefault(name, []).append(value)
        mib = 1024 * 1024
        return {
            name: {
                "start_mib": round(values[0] / mib, 1),
                "end_mib": round(values[-1] / mib, 1),
                "max_mib": round(max(values) / mib, 1),
            }
            for name, values in series.items()
        }
