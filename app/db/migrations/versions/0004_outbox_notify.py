"""Wake the dispatchers when a task joins the outbox (PostgreSQL's LISTEN/NOTIFY).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# app/tasks/dispatcher.py listens on this channel. A notification is only a hint that a row may
# be due: the dispatcher reads the outbox itself, so a lost or spurious one costs nothing.
# PostgreSQL sends it at commit, and folds identical ones of a transaction into one.
FUNCTION = """
CREATE FUNCTION taskdock_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('taskdock_outbox', '');
    RETURN NULL;
END
$$
"""
TRIGGER = """
CREATE TRIGGER task_outbox_notify
AFTER INSERT OR UPDATE OF published_at, status ON task
FOR EACH ROW
WHEN (NEW.published_at IS NULL AND NEW.status IN ('QUEUED', 'RETRYING'))
EXECUTE FUNCTION taskdock_outbox_notify()
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(FUNCTION)
    op.execute(TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS task_outbox_notify ON task")
    op.execute("DROP FUNCTION IF EXISTS taskdock_outbox_notify()")
