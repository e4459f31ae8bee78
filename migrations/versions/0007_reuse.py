"""reuse of identical work: the job option, each generated output's reuse key, reused outputs' origin

``jobs.reuse`` is the job option (off by default); ``jobs.reused_items`` is written at finish as the
other counts. ``artifacts.reuse_key`` (sha256 of weights digest, effective parameters, rendered prompt
and seed) is set on generated outputs and looked up once per chunk through a partial index;
``artifacts.reused_from_id`` names the artifact a reused output was copied from, and a partial index on
``job_id`` counts a job's reused outputs. Every new column is nullable or has a server default, so on
PostgreSQL adding them rewrites no table.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('reuse', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('jobs', sa.Column('reused_items', sa.Integer(), nullable=True))
    op.add_column('artifacts', sa.Column('reuse_key', sa.String(length=64), nullable=True))
    op.add_column('artifacts', sa.Column('reused_from_id', sa.BigInteger(), nullable=True))
    op.create_index('ix_artifacts_reuse_key', 'artifacts', ['reuse_key', 'id'], unique=False,
                    postgresql_where=sa.text('reuse_key IS NOT NULL'),
                    sqlite_where=sa.text('reuse_key IS NOT NULL'))
    op.create_index('ix_artifacts_reused_job', 'artifacts', ['job_id'], unique=False,
                    postgresql_where=sa.text('reused_from_id IS NOT NULL'),
                    sqlite_where=sa.text('reused_from_id IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_artifacts_reused_job', table_name='artifacts',
                  postgresql_where=sa.text('reused_from_id IS NOT NULL'),
                  sqlite_where=sa.text('reused_from_id IS NOT NULL'))
    op.drop_index('ix_artifacts_reuse_key', table_name='artifacts',
                  postgresql_where=sa.text('reuse_key IS NOT NULL'),
                  sqlite_where=sa.text('reuse_key IS NOT NULL'))
    op.drop_column('artifacts', 'reused_from_id')
    op.drop_column('artifacts', 'reuse_key')
    op.drop_column('jobs', 'reused_items')
    op.drop_column('jobs', 'reuse')
