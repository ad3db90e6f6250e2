"""The faults, one at a time in rotation; each one injects, then brings the system back."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from tests.chaos.memory import children
from tests.chaos.system import ChaosSystem
from tests.support.services import wait_for
from tests.support.stack import Proc


@dataclass
class FaultWindow:
    kind: str
    started: float
    ended: float
    detail: str


def kill_worker(system: ChaosSystem, rng: random.Random) -> str:
    """SIGKILL to a worker's whole group: the machine lost, no warm shutdown, no ack."""
    name = system.next_worker()
    proc = system.procs[name]
    pid = proc.pid
    proc.kill()
    system.start_worker(name)
    return f"{name} pid {pid}"


def kill_pool_child(system: ChaosSystem, rng: random.Random) -> str:
    """SIGKILL to one pool process, as the OOM killer would; the pool replaces it."""
    name = system.next_worker()
    main = live_worker(system, name).pid
    victim = rng.choice(children(main))
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: victim not in children(main) and len(children(main)) >= system.concurrency,
        timeout=30,
        what=f"{name}'s pool to replace child {victim}",
    )
    return f"{name} child pid {victim}"


def live_worker(system: ChaosSystem, name: str) -> Proc:
    """The worker with its pool up; one that is dying of an earlier fault is replaced first."""
    proc = system.procs[name]
    wait_for(
        lambda: bool(children(proc.pid)) or not proc.alive(),
        timeout=30,
        what=f"{name}'s pool",
    )
    if not proc.alive():
        system.revive()
    return system.procs[name]


def restart_broker(system: ChaosSystem, rng: random.Random) -> str:
    """Redis stopped and started on the same port; without persistence it comes back empty."""
    system.redis.stop()
    time.sleep(1)
    system.redis.start()
    return f"redis :{system.redis.port}"


def flush_broker(system: ChaosSystem, rng: random.Random) -> str:
    """Every message, binding and unacked delivery gone while everything keeps running."""
    client = redis.Redis(port=system.redis.port, socket_timeout=5)
    try:
        keys = client.dbsize()
        client.flushall()
    finally:
        client.close()
    return f"{keys} keys flushed"


def restart_database(system: ChaosSystem, rng: random.Random) -> str:
    """An immediate shutdown (a crash: clients cut off mid-transaction), down 2 s, recovery."""
    system.postgres.crash()
    time.sleep(2)
    system.postgres.start()
    return f"postgres :{system.postgres.port}"


def restart_api(system: ChaosSystem, rng: random.Random) -> str:
    """SIGTERM (a rolling deploy), then a new API process on the same port."""
    proc = system.procs["api"]
    pid = proc.pid
    code = proc.stop(timeout=30)
    system.start_api()
    return f"api pid {pid} exited {code}"


def stop_worker(system: ChaosSystem, rng: random.Random, seconds: float) -> str:
    """SIGSTOP a worker past its lease (a VM pause, a long GC), then SIGCONT: a zombie run."""
    name = system.next_worker()
    proc = system.procs[name]
    proc.signal_group(signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        proc.signal_group(signal.SIGCONT)
    return f"{name} stopped {seconds:.0f}s"


Fault = Callable[[ChaosSystem, random.Random], str]


def rotation(stop_seconds: float) -> list[tuple[str, Fault]]:
    """Every kind, ordered so that neighbours hit different parts of the system."""
    return [
        ("worker_kill", kill_worker),
        ("broker_flush", flush_broker),
        ("database_restart", restart_database),
        ("pool_child_kill", kill_pool_child),
        ("api_restart", restart_api),
        ("broker_restart", restart_broker),
        ("worker_stop", lambda system, rng: stop_worker(system, rng, stop_seconds)),
    ]


KINDS = [kind for kind, _ in rotation(0)]


def run_faults(
    system: ChaosSystem,
    *,
    until: float,
    interval: float,
    stop_seconds: float,
    rng: random.Random,
    first_after: float = 5.0,
) -> list[FaultWindow]:
    """Inject faults in rotation until the wall-clock time `until`; revive any casualty."""
    faults = rotation(stop_seconds)
    windows: list[FaultWindow] = []
    next_at = time.time() + first_after
    while next_at < until:
        _idle_until(system, next_at)
        kind, inject = faults[len(windows) % len(faults)]
        started = time.time()
        detail = inject(system, rng)
        windows.append(FaultWindow(kind, started, time.time(), detail))
        # Some quiet after each recovery, so every fault is seen on its own.
        next_at = max(started + interval, time.time() + 3)
    _idle_until(system, until)
    return windows


def _idle_until(system: ChaosSystem, moment: float) -> None:
    while time.time() < moment:
        system.revive()
        time.sleep(min(1.0, max(0.0, moment - time.time())))
