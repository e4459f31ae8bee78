"""the OpenAI-compatible API: keys, files and batches

API keys are stored as a sha256 only. A file's bytes live in the object store; a batch names the job
it became (none when its input failed validation) and the output / error files written at finalize.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('key_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_sha256', name=op.f('uq_api_keys_key_sha256')),
    sa.UniqueConstraint('name', name=op.f('uq_api_keys_name'))
    )
    op.create_table('api_files',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('owner', sa.String(length=32), nullable=True),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('purpose', sa.String(length=32), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('object_key', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['owner'], ['api_keys.id'], name=op.f('fk_api_files_owner_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_files'))
    )
    op.create_index(op.f('ix_api_files_owner'), 'api_files', ['owner'], unique=False)
    op.create_table('api_batches',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('owner', sa.String(length=32), nullable=True),
    sa.Column('job_id', sa.String(length=32), nullable=True),
    sa.Column('endpoint', sa.String(length=64), nullable=False),
    sa.Column('input_file_id', sa.String(length=64), nullable=False),
    sa.Column('completion_window', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=True),
    sa.Column('meta', sa.JSON(), nullable=True),
    sa.Column('errors', sa.JSON(), nullable=True),
    sa.Column('output_file_id', sa.String(length=64), nullable=True),
    sa.Column('error_file_id', sa.String(length=64), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('in_progress_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finalizing_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelling_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_api_batches_job_id_jobs'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['owner'], ['api_keys.id'], name=op.f('fk_api_batches_owner_api_keys'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_batches'))
    )
    op.create_index(op.f('ix_api_batches_job_id'), 'api_batches', ['job_id'], unique=False)
    op.create_index(op.f('ix_api_batches_owner'), 'api_batches', ['owner'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_api_batches_owner'), table_name='api_batches')
    op.drop_index(op.f('ix_api_batches_job_id'), table_name='api_batches')
    op.drop_table('api_batches')
    op.drop_index(op.f('ix_api_files_owner'), table_name='api_files')
    op.drop_table('api_files')
    op.drop_table('api_keys')
