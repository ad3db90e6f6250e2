"""schemathesis hooks for tests/api/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS)."""

from __future__ import annotations

from typing import Any

import schemathesis

# `GET /api/v1/tasks/{id}?wait=N` may rightly take N seconds (up to 60) on a task that is not
# final, longer than the fuzzer's 10-second request timeout. A valid N above this is made this;
# invalid values (0, 61, text) are left alone, so their 422 is still checked.
LONGEST_WAIT = 1.0


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    query = case.query
    if not isinstance(query, dict) or "wait" not in query:
        return
    try:
        value = float(query["wait"])
    except (TypeError, ValueError):
        return
    if LONGEST_WAIT < value <= 60:
        query["wait"] = LONGEST_WAIT
