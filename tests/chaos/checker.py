"""The loss check: the client's log against the task records and the execution ledger.

Like Jepsen's set checker: every acknowledged submission must end finished (nothing lost),
and nothing may exist that the client was told was not recorded (nothing unexpected).
A submission whose answer never came (indeterminate) may go either way.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from tests.chaos.faults import FaultWindow
from tests.chaos.load import ACCEPTED, INDETERMINATE, REJECTED, Request

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}
# Requests sent this soon after a fault ended still feel it (reconnects, a cold pool).
SETTLE_SECONDS = 5.0
# How near a fault an execution must start for the fault to take the blame for a rerun.
BLAME_SECONDS = 5.0


@dataclass
class TaskRow:
    id: str
    seq: int
    status: str
    attempt: int
    deliveries: int
    error: dict[str, Any] | None
    created_at: float
    finished_at: float | None


@dataclass
class Execution:
    task_id: str
    seq: int
    attempt: int
    delivery: int
    pid: int
    started_at: float
    finished_at: float | None


def check(
    requests: list[Request],
    tasks: list[TaskRow],
    ledger: list[Execution],
    faults: list[FaultWindow],
    origin: float,
) -> dict[str, Any]:
    by_seq: dict[int, list[TaskRow]] = defaultdict(list)
    for row in tasks:
        by_seq[row.seq].append(row)
    runs: dict[str, list[Execution]] = defaultdict(list)
    for execution in ledger:
        runs[execution.task_id].append(execution)
    sent = {request.seq: request for request in requests}
    accepted = [request for request in requests if request.outcome == ACCEPTED]
    accepted_rows = [row for r in accepted for row in by_seq.get(r.seq, [])]
    statuses = Counter(row.status for row in accepted_rows)
    lost = _lost(accepted, by_seq)
    unexpected = [
        row.seq for row in tasks if row.seq not in sent or sent[row.seq].outcome == REJECTED
    ]
    indeterminate = [request for request in requests if request.outcome == INDETERMINATE]
    return {
        "submitted": len(requests),
        "accepted": len(accepted),
        "rejected": sum(request.outcome == REJECTED for request in requests),
        "rejected_by_status": _rejections(requests),
        "indeterminate": len(indeterminate),
        "indeterminate_recorded": sum(bool(by_seq.get(r.seq)) for r in indeterminate),
        "completed": statuses.get("SUCCEEDED", 0),
        "failed": statuses.get("FAILED", 0),
        "cancelled": statuses.get("CANCELLED", 0),
        "failed_errors": dict(
            Counter(_error_type(row) for row in accepted_rows if row.status == "FAILED")
        ),
        "lost": len(lost),
        "lost_tasks": lost,
        "unexpected": len(unexpected),
        "unexpected_seqs": unexpected,
        "duplicate_records": sum(len(rows) - 1 for rows in by_seq.values() if len(rows) > 1),
        "succeeded_without_execution": [
            row.id
            for row in tasks
            if row.status == "SUCCEEDED"
            and not any(run.finished_at is not None for run in runs.get(row.id, []))
        ],
        "executions": len(ledger),
        "executions_unfinished": sum(run.finished_at is None for run in ledger),
        "run_more_than_once": _reruns(runs, faults, origin),
        "overlapping_executions": _overlaps(runs),
        "submit_latency_outside_faults": _latency(accepted, faults, origin),
        "time_to_finish": _time_to_finish(accepted_rows, origin),
    }


def _lost(accepted: list[Request], by_seq: dict[int, list[TaskRow]]) -> list[dict[str, Any]]:
    """Acknowledged, yet absent, replaced by another record, or never finished."""
    lost = []
    for request in accepted:
        rows = [row for row in by_seq.get(request.seq, []) if row.id == request.task_id]
        if not rows:
            lost.append({"seq": request.seq, "task_id": request.task_id, "status": "ABSENT"})
        elif rows[0].status not in TERMINAL:
            lost.append({"seq": request.seq, "task_id": request.task_id, "status": rows[0].status})
    return lost


def _rejections(requests: list[Request]) -> dict[str, int]:
    return dict(
        Counter(
            str(request.status_code or "connection refused")
            for request in requests
            if request.outcome == REJECTED
        )
    )


def _error_type(row: TaskRow) -> str:
    return str((row.error or {}).get("type", "unknown"))


def _reruns(
    runs: dict[str, list[Execution]], faults: list[FaultWindow], origin: float
) -> dict[str, Any]:
    """Tasks executed more than once, each blamed on the fault nearest its first execution."""
    blamed: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    extra = 0
    for task_id, executions in runs.items():
        if len(executions) < 2:
            continue
        extra += len(executions) - 1
        first = min(run.started_at for run in executions)
        kind = _blame(first, faults)
        blamed[kind] += 1
        examples.append({"task_id": task_id, "blamed": kind, "runs": _timeline(executions, origin)})
    return {
        "tasks": len(examples),
        "extra_executions": extra,
        "by_fault": dict(blamed),
        "examples": examples[:20],
    }


def _timeline(executions: list[Execution], origin: float) -> list[str]:
    """One line per execution: attempt.delivery, pid, start and end in seconds since start."""
    return [
        f"{run.attempt}.{run.delivery} pid {run.pid} {run.started_at - origin:.2f}s"
        f" -> {'-' if run.finished_at is None else f'{run.finished_at - origin:.2f}s'}"
        for run in sorted(executions, key=lambda run: run.started_at)
    ]


def _blame(moment: float, faults: list[FaultWindow]) -> str:
    near = [
        fault
        for fault in faults
        if fault.started - BLAME_SECONDS <= moment <= fault.ended + BLAME_SECONDS
    ]
    if not near:
        return "unattributed"
    return min(near, key=lambda fault: abs(moment - fault.started)).kind


def _overlaps(runs: dict[str, list[Execution]]) -> dict[str, int]:
    """Executions of one task running at the same time: a zombie run beside its successor.

    An execution that never wrote its end (its process was killed) ended at an unknown
    moment, so it is left out rather than assumed to run forever.
    """
    pairs = same_attempt = same_pid = 0
    for executions in runs.values():
        ordered = sorted(executions, key=lambda run: run.started_at)
        for index, earlier in enumerate(ordered):
            if earlier.finished_at is None:
                continue
            for later in ordered[index + 1 :]:
                if later.started_at < earlier.finished_at:
                    pairs += 1
                    same_attempt += later.attempt == earlier.attempt
                    same_pid += later.pid == earlier.pid
    return {"pairs": pairs, "same_attempt": same_attempt, "same_pid": same_pid}


def _latency(accepted: list[Request], faults: list[FaultWindow], origin: float) -> dict[str, Any]:
    calm = sorted(
        (request for request in accepted if request.latency is not None),
        key=lambda request: request.latency or 0.0,
    )
    calm = [
        request
        for request in calm
        # The first seconds are a cold start (connections, imports), not the steady state.
        if request.sent_at > origin + SETTLE_SECONDS
        and not any(
            fault.started <= request.sent_at <= fault.ended + SETTLE_SECONDS for fault in faults
        )
    ]
    if not calm:
        return {"requests": 0}
    seconds = [request.latency or 0.0 for request in calm]
    return {
        "requests": len(calm),
        "p50_ms": round(percentile(seconds, 50) * 1000, 1),
        "p99_ms": round(percentile(seconds, 99) * 1000, 1),
        "max_ms": round(seconds[-1] * 1000, 1),
        # When the slow ones were sent, to set beside the fault list.
        "slowest": [
            {
                "sent_s": round(request.sent_at - origin, 1),
                "ms": round((request.latency or 0) * 1000),
            }
            for request in calm[-10:]
        ],
    }


def _time_to_finish(rows: list[TaskRow], origin: float) -> dict[str, Any]:
    """From the record's creation to its end: what faults cost a task, end to end."""
    done = sorted(
        (row for row in rows if row.finished_at is not None),
        key=lambda row: (row.finished_at or 0.0) - row.created_at,
    )
    if not done:
        return {"tasks": 0}
    seconds = [(row.finished_at or 0.0) - row.created_at for row in done]
    return {
        "tasks": len(done),
        "p50_s": round(percentile(seconds, 50), 2),
        "p99_s": round(percentile(seconds, 99), 2),
        "max_s": round(seconds[-1], 2),
        "slowest": [
            {
                "task_id": row.id,
                "created_s": round(row.created_at - origin, 1),
                "took_s": round((row.finished_at or 0.0) - row.created_at, 1),
                "attempt": row.attempt,
                "deliveries": row.deliveries,
            }
            for row in done[-10:]
        ],
    }


def percentile(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]
