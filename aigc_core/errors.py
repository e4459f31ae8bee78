"""One error tree for the whole runner; boundaries wrap foreign errors with ``raise ... from e``."""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator


class AigcError(Exception):
    """Base of every error the runner raises on purpose."""


class SpecError(AigcError, ValueError):
    """Bad input from a user: the message says what to fix; nothing was written."""


class IdempotencyConflict(SpecError):
    """The idempotency key was already used with a different payload."""


class NotFound(AigcError, LookupError):
    """A job, item or model that does not exist."""


class ModelLoadError(AigcError):
    """A model could not be fetched or loaded; the items fail with this reason."""


class GenerationError(AigcError):
    """A backend failed on an item; that item fails, its neighbours do not."""


class TransientError(AigcError):
    """A fault that a retry may cure (storage, database, broker)."""


class StorageError(TransientError):
    """The object store refused or failed a request."""


class DatabaseUnavailable(TransientError):
    """The database could not be reached or is not migrated."""


class BrokerUnavailable(TransientError):
    """The message broker (Redis) could not be reached."""


class CannotListen(AigcError):
    """A server (``aigc metrics``) could not listen on its address: the port is taken or not ours."""


# ---- foreign errors at the command line's boundary ----------------------------------------------

def service_error(e: BaseException, *, database_url: str | None = None,
                  broker_url: str | None = None) -> AigcError | None:
    """The error behind ``e`` when it is a service that is not there (a database or broker that
    cannot be reached, a missing database, a port in use), as one of ours whose message is one line:
    the service, what was tried (URLs with their passwords masked) and a hint. None for anything else.

    Foreign libraries are recognised only when already imported: asking never imports redis or kombu.
    """
    for cause in _chain(e):
        if isinstance(cause, AigcError) and not isinstance(cause, DatabaseUnavailable):
            return None  # ours, and already worded (a StorageError, a SpecError)
        if _is(cause, "sqlalchemy.exc", "OperationalError", "InterfaceError") or \
                _is(cause, "psycopg", "OperationalError"):
            return _database(cause, database_url)
        if _is(cause, "sqlalchemy.exc", "ArgumentError", "NoSuchModuleError"):
            return DatabaseUnavailable(f"database: AIGC_DATABASE_URL {_mask(database_url)} is not a database URL "
                                       f"({_first_line(cause)}); hint: e.g. postgresql://user:password@host:5432/aigc "
                                       "or sqlite:///aigc.db")
        if _is(cause, "redis.exceptions", "ConnectionError", "TimeoutError") or \
                _is(cause, "kombu.exceptions", "OperationalError"):
            reason = _scrub(_first_line(cause), broker_url)
            return BrokerUnavailable(f"broker unreachable: {_mask(broker_url)} (AIGC_BROKER_URL): {reason}; hint: "
                                     "start Redis there, or point AIGC_BROKER_URL at it (unset: the embedded worker)")
        if isinstance(cause, OSError) and (where := _bind_address(cause)) is not None:
            why = "already in use" if cause.errno == errno.EADDRINUSE else (cause.strerror or str(cause)).lower()
            return CannotListen(f"cannot listen on {where}: the address is {why}; hint: stop what holds it, or "
                                "choose another with --port (or AIGC_METRICS_PORT)")
        if isinstance(cause, DatabaseUnavailable) and cause.__cause__ is None:
            return cause  # worded already ("... has no aigc tables: run `aigc db upgrade` first")
    return None


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while e is not None and id(e) not in seen and len(seen) < 10:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _is(e: BaseException, module: str, *names: str) -> bool:
    mod = sys.modules.get(module)
    classes = tuple(c for n in names if isinstance(c := getattr(mod, n, None), type))
    return bool(classes) and isinstance(e, classes)


def _mask(url: str | None) -> str:
    from aigc_core.settings import mask_url

    return mask_url(url)


def _password(url: str | None) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url or "").password
    except ValueError:
        return None


def _scrub(text: str, url: str | None) -> str:
    """A driver's message with the URL's password, should it quote it, masked."""
    pw = _password(url)
    return text.replace(pw, "***") if pw else text


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(e).__name__


_DB_HINTS = (  # (words in the driver's message, the hint)
    (("database", "does not exist"), "create it ({createdb}), then run `aigc db upgrade`"),
    (("password",), "check the user and password in AIGC_DATABASE_URL"),
    (("role", "does not exist"), "check the user in AIGC_DATABASE_URL"),
    (("unable to open database file",), "the folder of the SQLite file must exist and be writable"),
    (("no such table",), "run `aigc db upgrade`"),
    (("resolve host",), "check the host name in AIGC_DATABASE_URL"),
    (("name or service not known",), "check the host name in AIGC_DATABASE_URL"),
)


def _database(e: BaseException, url: str | None) -> DatabaseUnavailable:
    text = _first_line(e)
    reason = text.rsplit(" failed: ", 1)[-1].removeprefix("FATAL:").strip()  # psycopg: "connection to ... failed: why"
    reason = _scrub(reason, url)
    low = reason.lower()
    hint = next((h for words, h in _DB_HINTS if all(w in low for w in words)),
                "is the server running there and accepting connections? Check host and port in AIGC_DATABASE_URL")
    hint = hint.format(createdb=f"createdb {_database_name(url) or 'NAME'}")
    return DatabaseUnavailable(f"database unavailable: {_mask(url)} (AIGC_DATABASE_URL): {reason}; hint: {hint}")


def _database_name(url: str | None) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url or "").path.lstrip("/") or None
    except ValueError:
        return None


def _bind_address(e: OSError) -> str | None:
    """host:port of a failed bind (socketserver's ``server_address``, found in the traceback), else None."""
    if e.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
        return None
    tb = e.__traceback__
    address = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name in ("server_bind", "bind", "__init__"):
            candidate = frame.f_locals.get("server_address")
            if isinstance(candidate, tuple) and len(candidate) >= 2:
                address = candidate
        tb = tb.tb_next
    if address is None:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
