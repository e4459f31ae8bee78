"""reuse by reference: a reused output refers to the original's object instead of copying it

``artifacts.reused_from_job`` names the job whose object a reused output refers to, with a partial
index for gc's question whether any kept job refers to a job it would remove; ``jobs.removing`` is
gc's mark, taken in the transaction that decides to remove a job, after which no reuse refers to it.
Both columns are nullable or have a server default, so on PostgreSQL adding them rewrites no table.
A gc of an older release (or a downgrade below 0008 once references exist) is unaware of them:
removing an original's job would remove objects that other jobs' rows name. Upgrade every process
that runs gc before jobs with ``reuse`` run on this release.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('removing', sa.Boolean(), server_default=sa.text('false'), nullable=False))
    op.add_column('artifacts', sa.Column('reused_from_job', sa.String(length=32), nullable=True))
    op.create_index('ix_artifacts_reused_from_job', 'artifacts', ['reused_from_job'], unique=False,
                    postgresql_where=sa.text('reused_from_job IS NOT NULL'),
                    sqlite_where=sa.text('reused_from_job IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_artifacts_reused_from_job', table_name='artifacts',
                  postgresql_where=sa.text('reused_from_job IS NOT NULL'),
                  sqlite_where=sa.text('reused_from_job IS NOT NULL'))
    op.drop_column('artifacts', 'reused_from_job')
    op.drop_column('jobs', 'removing')
