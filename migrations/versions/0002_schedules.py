"""schedules

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('schedules',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('cron', sa.String(length=128), nullable=False),
    sa.Column('timezone', sa.String(length=64), nullable=False),
    sa.Column('template', sa.JSON(), nullable=False),
    sa.Column('catchup', sa.Enum('none', 'latest', 'all', name='schedule_catchup', native_enum=False, length=24), nullable=False),
    sa.Column('catchup_cap', sa.Integer(), nullable=False),
    sa.Column('max_concurrent', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('paused_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_slot', sa.String(length=20), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedules')),
    sa.UniqueConstraint('name', name=op.f('uq_schedules_name'))
    )
    op.create_table('schedule_runs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('schedule', sa.String(length=128), nullable=False),
    sa.Column('slot', sa.String(length=20), nullable=False),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('outcome', sa.Enum('pending', 'submitted', 'skipped_overlap', 'failed', name='schedule_run_outcome', native_enum=False, length=24), nullable=False),
    sa.Column('manual', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_schedule_runs_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['schedule'], ['schedules.name'], name=op.f('fk_schedule_runs_schedule_schedules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedule_runs')),
    sa.UniqueConstraint('schedule', 'slot', name=op.f('uq_schedule_runs_schedule_slot'))
    )


def downgrade() -> None:
    op.drop_table('schedule_runs')
    op.drop_table('schedules')
