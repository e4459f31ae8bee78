"""items: a partial index on claim_token

A delivery finds its own items (the heartbeat before each micro-batch, the commit, a release) by
its claim token; without this index PostgreSQL read every running item of every job to find them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_items_claim_token', 'items', ['claim_token'], unique=False,
                    postgresql_where=sa.text('claim_token IS NOT NULL'),
                    sqlite_where=sa.text('claim_token IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_items_claim_token', table_name='items')
