"""task_run keeps no foreign key to task: the purge deletes a task's runs itself.

A foreign key costs every INSERT of the referencing row a lookup of the referenced one, with a
row lock (`SELECT … FOR KEY SHARE`), and the worker's claim inserts a run for every task.
Measured on one connection, each task's insert, publication mark, claim and success in its own
transaction, alternating rounds: the constraint took 60 µs of the 617 µs of statement time per
task (pg_stat_statements), a third of what the run history added to the claim. It checked
nothing the statements do not already hold: a run's row is written only by a statement that
has just updated its task's row (the claim's and the outcomes' CTEs, `end_runs` after a
cancel, the reaper or a bulk action), and the retention purge, the one writer that deletes
tasks, deletes their runs in the same transaction (app.tasks.retention).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = "fk_task_run_task_id_task"


def upgrade() -> None:
    with op.batch_alter_table("task_run") as batch:
        batch.drop_constraint(FOREIGN_KEY, type_="foreignkey")


def downgrade() -> None:
    op.execute("DELETE FROM task_run WHERE task_id NOT IN (SELECT id FROM task)")
    with op.batch_alter_table("task_run") as batch:
        batch.create_foreign_key(FOREIGN_KEY, "task", ["task_id"], ["id"], ondelete="CASCADE")
