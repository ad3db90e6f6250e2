"""Task events: each status change gets an increasing `change_seq` and, on PostgreSQL, a
notification (app/tasks/events.py listens).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# One BEFORE trigger numbers the change and sends its summary: no statement of the API, the
# worker or the dispatcher changes, and the notification leaves at commit (a rolled-back change
# sends nothing). The payload stays far below NOTIFY's 8000 bytes: type and owner are bounded
# columns. Rows from before this migration keep a NULL change_seq: no event was ever sent for
# them, and numbering them here would rewrite the whole table.
PG_FUNCTION = """
CREATE FUNCTION taskdock_task_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_seq := nextval('task_change_seq');
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
    RETURN NEW;
END
$$
"""
PG_TRIGGERS = (
    """
    CREATE TRIGGER task_change_insert BEFORE INSERT ON task
    FOR EACH ROW EXECUTE FUNCTION taskdock_task_change()
    """,
    """
    CREATE TRIGGER task_change_update BEFORE UPDATE OF status ON task
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION taskdock_task_change()
    """,
)
# SQLite (one writer at a time, development only): max() + 1 under the write lock. The
# trigger's own UPDATE does not touch status, so it does not fire itself again.
_SQLITE_NUMBER = (
    "BEGIN UPDATE task SET change_seq = "
    "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM task) WHERE id = NEW.id; END"
)
SQLITE_TRIGGERS = (
    f"CREATE TRIGGER task_change_insert AFTER INSERT ON task FOR EACH ROW {_SQLITE_NUMBER}",
    "CREATE TRIGGER task_change_update AFTER UPDATE OF status ON task FOR EACH ROW "
    f"WHEN OLD.status IS NOT NEW.status {_SQLITE_NUMBER}",
)


def upgrade() -> None:
    with op.batch_alter_table("task") as batch:
        batch.add_column(sa.Column("change_seq", sa.BigInteger(), nullable=True))
    op.create_index("ix_task_owner_change_seq", "task", ["owner", "change_seq"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE SEQUENCE task_change_seq")
        op.execute(PG_FUNCTION)
        for trigger in PG_TRIGGERS:
            op.execute(trigger)
    else:
        for trigger in SQLITE_TRIGGERS:
            op.execute(trigger)


def downgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for trigger in ("task_change_update", "task_change_insert"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON task" if postgres else ""))
    if postgres:
        op.execute("DROP FUNCTION IF EXISTS taskdock_task_change()")
        op.execute("DROP SEQUENCE IF EXISTS task_change_seq")
    op.drop_index("ix_task_owner_change_seq", table_name="task")
    with op.batch_alter_table("task") as batch:
        batch.drop_column("change_seq")
