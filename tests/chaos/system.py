"""The system under test: private PostgreSQL and Redis, and taskdock's processes on top."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tests.chaos.memory import children
from tests.support.services import PostgresServer, RedisServer, wait_for
from tests.support.stack import Proc, Stack

WORKERS = ("w1", "w2")


@dataclass
class Exit:
    """A process that died without being told to: restarted, and reported."""

    name: str
    at: float
    returncode: int | None


@dataclass
class ChaosSystem:
    stack: Stack
    redis: RedisServer
    postgres: PostgresServer
    api_port: int
    concurrency: int = 2
    procs: dict[str, Proc] = field(default_factory=dict)
    exits: list[Exit] = field(default_factory=list)
    _victims: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> None:
        self.start_dispatcher()
        for name in WORKERS:
            self.start_worker(name)
        self.start_api()

    def start_api(self) -> None:
        self.procs["api"], _ = self.stack.api("api", port=self.api_port)

    def start_dispatcher(self) -> None:
        self.procs["dispatcher"] = self.stack.dispatcher()

    def start_worker(self, name: str) -> None:
        proc = self.stack.worker(name, concurrency=self.concurrency)
        self.procs[name] = proc
        # The pool comes up after the consumer: a fault aimed at a pool child needs it.
        wait_for(
            lambda: len(children(proc.pid)) >= self.concurrency,
            timeout=30,
            what=f"{name}'s pool",
        )

    def next_worker(self) -> str:
        """Faults aimed at a worker take turns between them."""
        self._victims += 1
        return WORKERS[self._victims % len(WORKERS)]

    def pids(self) -> dict[str, int | None]:
        return {name: proc.pid if proc.alive() else None for name, proc in self.procs.items()}

    def revive(self) -> list[Exit]:
        """Restart, and record, every process that died on its own."""
        found = []
        for name, proc in list(self.procs.items()):
            if proc.alive():
                continue
            assert proc.process is not None
            found.append(Exit(name=name, at=time.time(), returncode=proc.process.returncode))
            proc.kill()  # reap what is left of its group
            self.restart(name)
        self.exits.extend(found)
        return found

    def restart(self, name: str) -> None:
        if name == "api":
            self.start_api()
        elif name == "dispatcher":
            self.start_dispatcher()
        else:
            self.start_worker(name)
