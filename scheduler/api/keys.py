"""API keys: a key is shown once when created; only its sha256 is stored."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError

from aigc_core.db import Database
from aigc_core.errors import NotFound, SpecError
from aigc_core.schema import ApiKey, utcnow

KEY_PREFIX = "sk-aigc-"


@dataclass(frozen=True)
class KeyInfo:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None


def key_sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(db: Database, name: str) -> str:
    """A new key for NAME; the returned text is the only copy there will be."""
    if not name or len(name) > 128 or not name.isprintable():
        raise SpecError("key name: 1-128 printable characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    try:
        with db.session() as s:
            s.add(ApiKey(name=name, key_sha256=key_sha256(key)))
    except IntegrityError:
        raise SpecError(f"a key named {name!r} exists already (revoke it, or pick another name)") from None
    return key


def list_keys(db: Database) -> list[KeyInfo]:
    with db.session() as s:
        return [KeyInfo(k.id, k.name, k.created_at, k.revoked_at)
                for k in s.scalars(select(ApiKey).order_by(ApiKey.created_at))]


def revoke_key(db: Database, name: str) -> None:
    with db.session() as s:
        n = cast(CursorResult, s.execute(update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
                                         .values(revoked_at=utcnow()))).rowcount
    if not n:
        raise NotFound(f"no active key named {name!r}")


def key_owner(db: Database, key: str) -> str | None:
    """The id of the active key ``key``, or None."""
    with db.session() as s:
        return s.scalar(select(ApiKey.id).where(ApiKey.key_sha256 == key_sha256(key), ApiKey.revoked_at.is_(None)))
