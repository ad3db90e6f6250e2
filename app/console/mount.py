"""Where the console joins the app: its routes are built on the first request under /console.

Most API processes never serve a console page, and its routes, templates and their imports
(Jinja2, the forms, the queries) cost a process a third of its route building and 3 MB at
start (docs/performance.md). So `mount` puts one placeholder route where the console's routes
go; the first request it matches imports `app.console.router`, includes the console's routers
in place of the placeholder, and is routed again, now to the real route. Loading is
synchronous, on the event loop, so two first requests cannot both load it.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound
from starlette.types import Receive, Scope, Send

PREFIX = "/console"


class _Deferred(BaseRoute):
    def __init__(self, app: FastAPI) -> None:
        self._app = app

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http":
            # The path as routes see it: without the root path a proxy serves the app under.
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path == PREFIX or path.startswith(PREFIX + "/"):
                return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> URLPath:
        raise NoMatchFound(name, path_params)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = self._app.router.routes
        if self in routes:
            from app.console.router import mount as include

            routes.remove(self)
            include(self._app)
        await self._app.router(scope, receive, send)


def mount(app: FastAPI) -> None:
    """Serve the console from this app, from its first request on."""
    app.router.routes.append(_Deferred(app))
