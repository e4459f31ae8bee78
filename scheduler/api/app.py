"""``create_app``: the FastAPI app, its shared state, bearer-key auth and the upload size cap."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aigc_core.settings import Settings
from scheduler.api.errors import ApiError, error_response, install_handlers
from scheduler.api.keys import key_owner
from scheduler.client import Client


@dataclass
class Api:
    client: Client
    auth: bool

    @property
    def max_file_bytes(self) -> int:
        return self.client.settings.api_max_file_bytes


@dataclass(frozen=True)
class Caller:
    """Who is asking: the key's id (None without auth, where everything is visible)."""

    owner: str | None
    auth: bool

    def owns(self, owner: str | None) -> bool:
        return not self.auth or owner == self.owner


def api_of(request: Request) -> Api:
    api: Api = request.app.state.api
    return api


def caller(request: Request) -> Caller:
    api = api_of(request)
    if not api.auth:
        return Caller(None, False)
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key")
    owner = key_owner(api.client.db, key.strip())
    if owner is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return Caller(owner, True)


CallerDep = Annotated[Caller, Depends(caller)]
ApiDep = Annotated[Api, Depends(api_of)]


class UploadCap:
    """Refuses a request body over the cap with 413 (by Content-Length before anything is read, else
    as it streams). The rest of the body is read and dropped, so the client sees the answer rather
    than a connection reset halfway through its upload."""

    def __init__(self, app: ASGIApp, max_bytes: int, drain_limit: int = 1 << 30):
        self.app, self.max_bytes, self.drain_limit = app, max_bytes, drain_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/files":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes + 64 * 1024  # multipart framing around the file itself
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, pending=True)
            return
        seen, over, pending = 0, False, True

        async def counted() -> Message:
            nonlocal seen, over, pending
            if over:
                raise _TooLarge
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                pending = bool(msg.get("more_body", False))
                if seen > limit:
                    over = True
                    raise _TooLarge
            return msg

        async def quiet(msg: Message) -> None:
            if not over:  # once over, the app's own answer (a parse error) gives way to the 413
                await send(msg)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted, quiet)
        if over:
            await self._refuse(scope, receive, send, pending=pending)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, pending: bool) -> None:
        drained = 0
        while pending and drained < self.drain_limit:
            msg = await receive()
            drained += len(msg.get("body", b""))
            pending = msg["type"] == "http.request" and bool(msg.get("more_body", False))
        response = error_response(413, f"The file is larger than the limit of {self.max_bytes} bytes "
                                  "(AIGC_API_MAX_FILE_BYTES).", param="file", code="file_too_large")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(settings: Settings | None = None, *, auth: bool = True, client: Client | None = None) -> FastAPI:
    """The /v1 app over the database and store that ``settings`` name (AIGC_* when None); the upload
    cap and the requests a batch may hold are ``AIGC_API_MAX_FILE_BYTES`` / ``AIGC_API_MAX_BATCH_REQUESTS``."""
    from scheduler.api import batches, files

    client = client or Client(settings or Settings())
    app = FastAPI(title="aigc-runner OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.api = Api(client, auth)
    install_handlers(app)
    app.add_middleware(UploadCap, max_bytes=client.settings.api_max_file_bytes)
    app.include_router(files.router)
    app.include_router(batches.router)

    @app.get("/v1/models")
    def list_models(api: ApiDep, who: CallerDep) -> dict[str, Any]:
        data = [{"id": m["name"], "object": "model", "created": _epoch_iso(m["created_at"]),
                 "owned_by": "aigc-runner", "kind": m["kind"], "version": m["version"]}
                for m in api.client.models()]
        latest: dict[str, dict[str, Any]] = {}
        for m in data:  # one entry per name, its newest version
            if m["id"] not in latest or m["version"] > latest[m["id"]]["version"]:
                latest[m["id"]] = m
        return {"object": "list", "data": list(latest.values())}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    from scheduler.api import dashboard  # the web dashboard at / (scheduler/api/dashboard/)
    dashboard.install(app)
    return app


def _epoch_iso(text: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(text).timestamp())
