"""chunks finish; items indexed by (status, finished_at); finished jobs keep their item counts

Chunks whose items are all final become ``done`` (a new value of the non-native chunk_status enum,
so no type change), so the reconciler's candidate scan and the outbox count read only open chunks.
Recent activity reads a range of ``ix_items_status_finished`` instead of the whole items table.
A finished job keeps its items' counts by final state, so counting finished work reads the jobs
table. Existing chunks of finished jobs are marked done, and finished jobs' counts filled in, here.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    for name in ('succeeded_items', 'failed_items', 'cancelled_items'):
        op.add_column('jobs', sa.Column(name, sa.Integer(), nullable=True))
    for state in ('succeeded', 'failed', 'cancelled'):
        op.execute(sa.text(
            f"UPDATE jobs SET {state}_items = (SELECT count(*) FROM items "
            f"WHERE items.job_id = jobs.id AND items.status = '{state}') WHERE finished_at IS NOT NULL"))
    op.create_index('ix_items_status_finished', 'items', ['status', 'finished_at'], unique=False)
    op.execute(sa.text(
        "UPDATE chunks SET status = 'done' WHERE status = 'published' "
        "AND job_id IN (SELECT id FROM jobs WHERE finished_at IS NOT NULL)"))


def downgrade() -> None:
    op.execute(sa.text("UPDATE chunks SET status = 'published' WHERE status = 'done'"))
    op.drop_index('ix_items_status_finished', table_name='items')
    for name in ('cancelled_items', 'failed_items', 'succeeded_items'):
        op.drop_column('jobs', name)
