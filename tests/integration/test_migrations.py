"""Alembic migrations and the SQLAlchemy models agree on PostgreSQL; downgrade and upgrade again work."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from aigc_core.db import Database
from aigc_core.schema import Base

pytestmark = pytest.mark.integration


def test_migrated_postgres_matches_the_models(pg_url):
    db = Database(pg_url)
    with db.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    db.engine.dispose()
    assert diff == [], f"models and migrations disagree (write a migration): {diff}"


def test_downgrade_to_base_and_upgrade_again(pg_url):
    from alembic import command

    from aigc_core.db import alembic_config

    cfg = alembic_config(Database(pg_url).url)
    command.downgrade(cfg, "base")
    db = Database(pg_url)
    assert not db.has_schema()
    command.upgrade(cfg, "head")
    assert db.has_schema()
    db.engine.dispose()
