"""The web dashboard at ``/``: jobs, a job's outputs, an item's provenance, models and schedules.
Server-rendered (Jinja2) with one small script; every asset ships in this package."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.api.dashboard.session import CsrfFailed, DashboardSettings, LoginNeeded, Sessions

# Pages load their script, styles and outputs from this server only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: https: http:; "
       "media-src 'self' https: http:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")


def install(app: FastAPI, settings: DashboardSettings | None = None) -> None:
    """Add the dashboard's routes, assets and login handling to the API app."""
    from scheduler.api.dashboard import outputs, views

    settings = settings or DashboardSettings()
    app.state.dashboard_settings = settings
    app.state.dashboard_sessions = Sessions(settings.secret, settings.session_hours)
    app.include_router(views.router)
    app.include_router(outputs.router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"), name="dashboard-static")
    app.add_exception_handler(LoginNeeded, _to_login)
    app.add_exception_handler(CsrfFailed, _csrf_failed)
    app.add_middleware(PageHeaders)


async def _to_login(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/ui/progress"):
        return PlainTextResponse("session expired", status_code=401)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


async def _csrf_failed(request: Request, exc: Exception) -> Response:
    return PlainTextResponse("This form is out of date (CSRF token missing or wrong): reload the page and try again.",
                             status_code=403)


class PageHeaders:
    """Security headers on the dashboard's HTML pages (not on /v1, whose answers are JSON)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def send_with(msg: Message) -> None:
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                names = {k.lower() for k, _ in headers}
                if b"text/html" in dict(headers).get(b"content-type", b""):
                    if b"content-security-policy" not in names:
                        headers.append((b"content-security-policy", CSP.encode()))
                    headers.append((b"x-frame-options", b"DENY"))
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"same-origin"))
                msg = {**msg, "headers": headers}
            await send(msg)

        await self.app(scope, receive, send_with)


__all__ = ["DashboardSettings", "install"]
