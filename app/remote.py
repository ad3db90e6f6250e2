"""`taskdock tasks …`: tasks on a running taskdock, over its HTTP API with `app.client`.

Unlike the other commands, these need no database or broker settings: only where the API is
(TASKDOCK_URL) and, with auth on, a key (TASKDOCK_API_KEY). Errors print the API's error on one
line and exit 1; `--json` prints what the API answered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer

from app.tasks.states import TERMINAL, TaskStatus

if TYPE_CHECKING:
    from app.client import Client, Task

tasks = typer.Typer(
    help="Submit, list, show, cancel and retry tasks on a running taskdock (TASKDOCK_URL).",
    no_args_is_help=True,
)

Url = Annotated[
    str,
    typer.Option("--url", envvar="TASKDOCK_URL", help="The API's base URL."),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="TASKDOCK_API_KEY", help="An API key (auth on).", show_default=False
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
DEFAULT_URL = "http://127.0.0.1:8000"


@contextmanager
def _client(url: str, api_key: str | None) -> Iterator[Client]:
    # Imported here, not above: every `taskdock` command (the API and the worker too) imports
    # this module to list its commands, and httpx with the client's models cost the API's
    # process 60 ms and 6 MB at start that it never uses (bench/results/2026-12-04-abfp-*).
    import httpx

    from app.client import ApiError, Client, InvalidRequest

    try:
        with Client(url, api_key=api_key) as client:
            yield client
    except InvalidRequest as exc:
        where = "; ".join(
            f"{'.'.join(str(part) for part in field['loc'])}: {field['msg']}"
            for field in exc.fields
        )
        typer.echo(f"error: {exc}{f' ({where})' if where else ''}", err=True)
        raise typer.Exit(1) from None
    except ApiError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except httpx.TransportError as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(1) from None


def _show(task: Task, as_json: bool) -> None:
    if as_json:
        typer.echo(task.model_dump_json(indent=2))
        return
    typer.echo(f"{task.id}  {task.type}  {task.status}  attempt {task.attempt}/{task.max_attempts}")
    if task.result is not None:
        typer.echo(f"result: {json.dumps(task.result)}")
    if task.error is not None:
        typer.echo(f"error: {task.error.type}: {task.error.message}")


def _exit_code(task: Task) -> int:
    return 0 if task.status not in TERMINAL or task.status == TaskStatus.SUCCEEDED else 1


def _wait(client: Client, task: Task, timeout: float) -> Task:
    """Wait for the task, telling each status change on stderr as it comes."""
    began = time.monotonic()
    seen = task.status
    typer.echo(f"{task.id}: {seen}", err=True)
    while task.status not in TERMINAL and time.monotonic() - began < timeout:
        task = client.wait(task.id, timeout=min(5.0, timeout - (time.monotonic() - began)))
        if task.status != seen:
            seen = task.status
            typer.echo(f"{task.id}: {seen} after {time.monotonic() - began:.1f} s", err=True)
    return task


@tasks.command("submit")
def submit(
    type_: Annotated[str, typer.Argument(metavar="TYPE", help="A registered task type.")],
    payload: Annotated[str, typer.Option(help="The payload, a JSON object.")] = "{}",
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the task is final.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 300.0,
    idempotency_key: Annotated[str | None, typer.Option(show_default=False)] = None,
    countdown: Annotated[float | None, typer.Option(help="Seconds before it runs.")] = None,
    queue: Annotated[str | None, typer.Option(show_default=False)] = None,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Submit a task; with --wait, exit 1 unless it SUCCEEDED."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        typer.echo(f"error: --payload is not JSON: {exc}", err=True)
        raise typer.Exit(2) from None
    if not isinstance(body, dict):
        typer.echo("error: --payload must be a JSON object", err=True)
        raise typer.Exit(2)
    with _client(url, api_key) as client:
        task = client.submit(
            type_, body, idempotency_key=idempotency_key, countdown=countdown, queue=queue
        )
        if wait:
            task = _wait(client, task, timeout)
    _show(task, as_json)
    if wait:
        raise typer.Exit(_exit_code(task))


@tasks.command("show")
def show(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the task is final.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait at most.")] = 300.0,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """One task's record."""
    with _client(url, api_key) as client:
        task = client.get(task_id)
        if wait:
            task = _wait(client, task, timeout)
    _show(task, as_json)


@tasks.command("list")
def list_(
    status: Annotated[TaskStatus | None, typer.Option(show_default=False)] = None,
    type_: Annotated[str | None, typer.Option("--type", show_default=False)] = None,
    limit: Annotated[int, typer.Option(min=1, help="How many, newest first.")] = 20,
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Tasks, newest first."""
    with _client(url, api_key) as client:
        found: list[Task] = []
        for task in client.list(status=status, type=type_, page_size=min(limit, 200)):
            found.append(task)
            if len(found) == limit:
                break
    if as_json:
        typer.echo(json.dumps([task.model_dump(mode="json") for task in found], indent=2))
        return
    for task in found:
        typer.echo(f"{task.id}  {task.created_at:%Y-%m-%d %H:%M:%S}  {task.status:<9}  {task.type}")


@tasks.command("cancel")
def cancel(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Cancel a waiting or running task."""
    with _client(url, api_key) as client:
        _show(client.cancel(task_id), as_json)


@tasks.command("retry")
def retry(
    task_id: Annotated[str, typer.Argument(help="The task's id.")],
    url: Url = DEFAULT_URL,
    api_key: ApiKey = None,
    as_json: AsJson = False,
) -> None:
    """Run a FAILED or CANCELLED task again, as a new attempt."""
    with _client(url, api_key) as client:
        _show(client.retry(task_id), as_json)
