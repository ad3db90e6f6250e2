"""Python's cyclic garbage collector at a process's start: paused while the process builds what
it serves, then resumed with those objects set aside.

A start makes some 140,000 objects (modules, classes, pydantic models, SQLAlchemy mappers,
routes) that live as long as the process. The collector walks them again and again while they
are made and frees none of them: 60 to 80 ms of the API's start, a tenth of it
(docs/performance.md). So `taskdock` (app.cli.main) pauses it first, and each process resumes it
once it is built:

- the API in its lifespan, before its first answer (with several workers, uvicorn's supervisor
  before it starts them; they are fresh interpreters with the collector on);
- a worker's main process before it forks its pool (`worker_init`), so the children inherit
  what it froze;
- the dispatcher before its loop; any other command as it starts (app.cli's callback).

`resume` freezes what exists (`gc.freeze`): the collector never scans those objects again. A full
collection then stays short, and a prefork child no longer writes to every page it shares with
its parent by scanning them, as the gc module's documentation advises for processes that fork.
"""

from __future__ import annotations

import gc


def pause() -> None:
    gc.disable()


def resume() -> None:
    """Freeze what exists and turn the collector on; nothing if it is on already (a process not
    started by `taskdock`, such as the tests or `uvicorn app.main:app`)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
