"""Who is looking: a login form takes an API key and sets a signed, HttpOnly session cookie; every POST
form carries a CSRF token derived from that session."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select

from aigc_core.schema import ApiKey
from scheduler.api.app import api_of
from scheduler.api.keys import key_owner

COOKIE = "aigc_session"


class DashboardSettings(BaseSettings):
    """The dashboard's knobs (prefix ``AIGC_DASHBOARD_``)."""

    model_config = SettingsConfigDict(env_prefix="AIGC_DASHBOARD_", extra="ignore")

    # Signs session cookies. Unset: a random one per process (sessions end at restart, and replicas
    # behind one address must share a secret, so set it there).
    secret: str | None = None
    session_hours: float = Field(12.0, gt=0)
    # Gallery items per page; a page is one keyset query however large the job.
    page_size: int = Field(48, ge=1, le=500)
    # Presigned S3 URLs for output bytes live this long.
    presign_s: int = Field(300, ge=1, le=3600)


@dataclass(frozen=True)
class Viewer:
    """A signed-in session: the key's id (None when the server runs without auth) and its nonce."""

    owner: str | None
    nonce: str
    new_cookie: str | None = None  # set on the response when the session was made just now


class LoginNeeded(Exception):
    """Raised by ``viewer`` when there is no valid session: the app answers with the login page."""


class CsrfFailed(Exception):
    """A POST without the form token of its session."""


class Sessions:
    def __init__(self, secret: str | None, hours: float):
        self.secret = (secret or secrets.token_urlsafe(32)).encode()
        self.max_age = int(hours * 3600)

    def _sign(self, body: bytes) -> str:
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    def make(self, owner: str | None) -> tuple[str, str]:
        """A new cookie value and its nonce."""
        nonce = secrets.token_urlsafe(16)
        payload = {"o": owner, "n": nonce, "e": int(time.time()) + self.max_age}
        body = base64.urlsafe_b64encode(json.dumps(payload, separators=(",", ":")).encode())
        return f"{body.decode()}.{self._sign(body)}", nonce

    def read(self, value: str | None) -> tuple[str | None, str] | None:
        """(owner, nonce) of a cookie that this server signed and that has not expired; else None."""
        if not value or "." not in value:
            return None
        body, _, sig = value.rpartition(".")
        if not hmac.compare_digest(sig, self._sign(body.encode())):
            return None
        try:
            payload = json.loads(base64.urlsafe_b64decode(body.encode()))
        except ValueError:
            return None
        if not isinstance(payload, dict) or payload.get("e", 0) < time.time():
            return None
        return payload.get("o"), str(payload.get("n"))

    def csrf(self, nonce: str) -> str:
        return self._sign(f"csrf:{nonce}".encode())


def sessions_of(request: Request) -> Sessions:
    s: Sessions = request.app.state.dashboard_sessions
    return s


def viewer(request: Request) -> Viewer:
    """The session behind this request. Without auth everyone gets a session (for the CSRF token);
    with auth the key it was made with must still be valid (a revoked key ends its sessions)."""
    api, sessions = api_of(request), sessions_of(request)
    found = sessions.read(request.cookies.get(COOKIE))
    if not api.auth:
        if found is not None:
            return Viewer(None, found[1])
        cookie, nonce = sessions.make(None)
        return Viewer(None, nonce, cookie)
    if found is None or found[0] is None:
        raise LoginNeeded
    with api.client.db.session() as s:
        live = s.scalar(select(ApiKey.id).where(ApiKey.id == found[0], ApiKey.revoked_at.is_(None)))
    if live is None:
        raise LoginNeeded
    return Viewer(found[0], found[1])


def login_viewer(request: Request, *, create: bool = True) -> Viewer:
    """The session of the login form: the browser's current one's nonce (signed in or not), else a new
    signed-out one whose cookie the form's page sets; its nonce makes the form's CSRF token. With
    ``create=False`` (the form's POST) a browser without a session gets one that no token matches."""
    found = sessions_of(request).read(request.cookies.get(COOKIE))
    if found is not None:  # its key may be revoked since: the login page shows nobody signed in
        return Viewer(None, found[1])
    if not create:
        return Viewer(None, secrets.token_urlsafe(16))
    cookie, nonce = sessions_of(request).make(None)
    return Viewer(None, nonce, cookie)


def login(request: Request, key: str) -> str | None:
    """A session cookie for a valid API key; None for a wrong or revoked one."""
    owner = key_owner(api_of(request).client.db, key.strip()) if key.strip() else None
    if owner is None:
        return None
    return sessions_of(request).make(owner)[0]


def check_csrf(request: Request, who: Viewer, token: str) -> None:
    if not hmac.compare_digest(token or "", sessions_of(request).csrf(who.nonce)):
        raise CsrfFailed
