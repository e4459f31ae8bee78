"""items may carry chat messages instead of a prompt

An item of a chat job holds ``messages`` (OpenAI's chat shape, a JSON list of {role, content});
the worker renders them with the model's chat template. Items with a plain prompt keep NULL.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('items', sa.Column('messages', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('items', 'messages')
