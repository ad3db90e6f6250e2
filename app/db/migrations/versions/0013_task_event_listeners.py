"""Task events are sent only while an API process listens for them.

Migration 0010's trigger sent a notification for every status change. A NOTIFY is not free:
at commit PostgreSQL takes one lock for the whole database to append it to the notification
queue, and holds it to the end of the commit, so every writing transaction queues behind the
others. Measured with pgbench on this project's own claim and finish statements (8 clients,
alternating rounds): 1,123 tasks/s with the notification against 2,013 without the trigger,
and 1.32 ms against 0.82 ms of PostgreSQL CPU per task; the same with an empty payload, so the
cost is the NOTIFY, not the JSON.

Now an API process's event hub registers its LISTEN connection in `task_event_listener` while
someone waits or streams (app/tasks/events.py), and the trigger sends only when a row is there:
a status change still takes its `change_seq` (the stream's replay reads it), and costs 0.97 ms
of PostgreSQL CPU per task while nobody listens. UNLOGGED: a crash empties it, and a hub that
reconnects registers again.

The trigger takes the transaction's id before it reads the table. A hub that registers waits
until every transaction that was running at its registration has ended (`pg_current_snapshot`)
before it tells its waiters and streams to read the table again: a change whose trigger ran
before the registration is committed by then, and one whose trigger runs after it notifies.
Without the id taken first, a transaction could read "nobody listens", then get its id after
the hub's snapshot and commit unseen.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NOTIFY = """
    PERFORM pg_notify('taskdock_events', json_build_object(
        'seq', NEW.change_seq,
        'id', NEW.id,
        'status', NEW.status,
        'owner', NEW.owner,
        'type', NEW.type,
        'queue', NEW.queue,
        'attempt', NEW.attempt,
        'updated_at', to_char(NEW.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
    )::text);
"""
PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION taskdock_task_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    NEW.change_seq := nextval('task_change_seq');
    IF EXISTS (SELECT FROM task_event_listener) THEN
        {_NOTIFY}
    END IF;
    RETURN NEW;
END
$$
"""
PG_FUNCTION_0010 = f"""
CREATE OR REPLACE FUNCTION taskdock_task_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('task_change_seq');
    {_NOTIFY}
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    # On SQLite the table is there for the models' sake and stays empty: it has no NOTIFY.
    op.create_table(
        "task_event_listener",
        sa.Column("pid", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        prefixes=["UNLOGGED"] if postgres else [],
    )
    if postgres:
        op.execute(PG_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_FUNCTION_0010)
    op.drop_table("task_event_listener")
