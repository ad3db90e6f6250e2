"""The console: taskdock's web pages, served by the API process at /console.

A map, outside in:

- `mount.py`: where the console joins the app. Its routes are built on the first request under
  /console, so an API process that never serves a page never loads them (nor Jinja2).
- `router.py`: the pages (overview, tasks, task detail with its runs and webhook deliveries,
  submit, task types, login), the small JSON routes their script reads for live updates, and
  `/console/events`, the task event stream (app/tasks/events.py) that tells the script when to
  read them. Every route is a `ConsoleRoute`, which puts the Content-Security-Policy and the
  other security headers on every answer and renders the app's errors
  (`app.core.errors.AppError`) as HTML pages instead of the API's JSON. Table rows have one
  shape (`table_row`) for the page's first render (templates/rows.html) and its live updates.
- `bulk.py`: bulk cancel or retry by filter: the API's dry-run count, then a confirmation.
- `schedules.py`: list, create, pause, resume and delete schedules.
- `session.py`: who is looking. Login with an API key gives a signed, HttpOnly, SameSite=Strict
  cookie holding the key's id (never the key) and a CSRF token; every request reloads the key
  (through a cache as short as the API's), so a revoked key stops working as it does on the
  API. Every POST carries the token in a hidden field and is refused (403) without it.
- `queries.py`: the reads behind the pages, each bounded: keyset pages, counts that stop at a
  limit, the overview's sums over indexed rows only.
- `forms.py`: a task type's JSON Schema as form fields, and the fields back as a payload.
- `templates/` (Jinja2, autoescaped) and `static/` (one script, one stylesheet; no inline
  script or style, no library, nothing to build).

Actions (submit, cancel, retry, bulk, schedules) call the same services as the API routes
(`app.tasks.publication.Submitter`, `app.tasks.service`, `app.tasks.bulk`,
`app.schedules.service`), with the same scope checks, owner
filter and rate limits, so the console can never do what the key could not do over HTTP.
"""
