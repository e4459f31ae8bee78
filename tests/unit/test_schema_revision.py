"""The schema revision a release needs: SQLite catches up on its own, a server database that is behind
says to run `aigc db upgrade`."""

from __future__ import annotations

from sqlalchemy import text

from aigc_core.db import SCHEMA_HEAD, Database, alembic_config


def test_the_release_names_alembics_head():
    from alembic.script import ScriptDirectory

    assert ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head() == SCHEMA_HEAD


def test_an_embedded_database_left_behind_by_an_older_release_is_migrated_on_first_use(tmp_path):
    from alembic import command

    url = f"sqlite:///{tmp_path}/aigc.db"
    command.upgrade(alembic_config(url), "0007")  # what the previous release left
    db = Database(url)
    assert db.revision() == "0007"
    db.ensure_schema()
    assert db.revision() == SCHEMA_HEAD
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT removing FROM jobs")).all() == []


def test_a_newer_schema_is_accepted(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/aigc.db")
    db.ensure_schema()
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    db.ensure_schema()  # a later release migrated it (migrations add): this one still runs, nothing changes
    assert db.revision() == "9999"
