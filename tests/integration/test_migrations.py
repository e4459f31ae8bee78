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


def test_a_server_database_behind_this_release_says_to_run_aigc_db_upgrade(pg_url):
    from sqlalchemy import text

    from aigc_core.db import SCHEMA_HEAD
    from aigc_core.errors import DatabaseUnavailable

    db = Database(pg_url)
    try:
        db.ensure_schema()  # at head: nothing to say
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '0007'"))
        with pytest.raises(DatabaseUnavailable, match=r"at schema revision 0007 and this release needs "
                                                      rf"{SCHEMA_HEAD}: run `aigc db upgrade`"):
            db.ensure_schema()
        assert db.revision() == "0007"  # a server database is never migrated behind its operator's back
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": SCHEMA_HEAD})
        db.engine.dispose()
