"""Engine and session factory, and schema creation through Alembic."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from aigc_core.errors import DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# The newest migration this release needs (tests/unit/test_schema_revision.py checks it is Alembic's
# head): read here rather than from the migration scripts, which would cost every process a parse.
SCHEMA_HEAD = "0008"


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here, the driver the project installs."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


_opened: weakref.WeakSet[Database] = weakref.WeakSet()


class Database:
    """One engine and a session factory; ``session()`` commits or rolls back as a unit."""

    def __init__(self, url: str):
        self.url = normalize_url(url)
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        _opened.add(self)

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as s:
                yield s
        except OperationalError as e:
            raise DatabaseUnavailable(f"database error: {e.orig or e}") from e

    def upgrade(self) -> None:
        """Bring the schema to the newest migration (``aigc db upgrade``)."""
        from alembic import command

        command.upgrade(alembic_config(self.url), "head")

    def has_schema(self) -> bool:
        return inspect(self.engine).has_table("jobs")

    def revision(self) -> str | None:
        """The schema's Alembic revision (None: never migrated). Read with plain SQL: importing Alembic
        would cost every process a third of a second."""
        if not inspect(self.engine).has_table("alembic_version"):
            return None
        with self.engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def ensure_schema(self) -> None:
        """SQLite (the embedded default) is migrated on first use and after an upgrade of the package;
        a server database older than this release is an error that says to run ``aigc db upgrade``
        (a newer one is accepted: migrations add, so an older release still runs against it)."""
        where = self.engine.url.render_as_string(hide_password=True)
        if not self.has_schema():
            if self.engine.dialect.name == "sqlite":
                self.upgrade()
                return
            raise DatabaseUnavailable(f"database {where} has no aigc tables: run `aigc db upgrade` first")
        rev = self.revision()
        if rev is None or not _older(rev, SCHEMA_HEAD):
            return  # None: tables Alembic did not make (create_all); not ours to migrate
        if self.engine.dialect.name == "sqlite":
            self.upgrade()
            return
        raise DatabaseUnavailable(f"database {where} is at schema revision {rev} and this release "
                                  f"needs {SCHEMA_HEAD}: run `aigc db upgrade`")


def _older(rev: str, than: str) -> bool:
    """Revision ids are four digits here; one that is not (someone's own migration) is not judged."""
    return rev.isdigit() and than.isdigit() and int(rev) < int(than)


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@lru_cache(maxsize=8)
def database(url: str) -> Database:
    """One Database per URL per process, so connections are pooled and reused."""
    return Database(url)


def close_all() -> None:
    """Close every pooled connection this process opened (before it ends without running atexit)."""
    for db in list(_opened):
        db.engine.dispose()
