"""The dashboard's pages, its progress endpoint and its POST actions (cancel, retry, pause, resume)."""

from __future__ import annotations

import json
import pprint
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from aigc_core.errors import NotFound, SpecError
from aigc_core.jobs import job_view
from aigc_core.schema import JobStatus
from scheduler.api.app import api_of
from scheduler.api.dashboard import data
from scheduler.api.dashboard.session import (
    COOKIE,
    CsrfFailed,
    DashboardSettings,
    Viewer,
    check_csrf,
    login,
    login_viewer,
    sessions_of,
    viewer,
)
from scheduler.cron import admin

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
ViewerDep = Annotated[Viewer, Depends(viewer)]
JOB_ID_CHARS = set("0123456789abcdef")


def settings_of(request: Request) -> DashboardSettings:
    s: DashboardSettings = request.app.state.dashboard_settings
    return s


def render(request: Request, who: Viewer | None, name: str, ctx: dict[str, Any], status: int = 200) -> Response:
    api = api_of(request)
    base = {"auth": api.auth, "csrf": sessions_of(request).csrf(who.nonce) if who else "",
            "signed_in": who is not None and who.owner is not None}
    resp = templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)
    if who is not None and who.new_cookie:
        set_session(request, resp, who.new_cookie)
    return resp


def set_session(request: Request, resp: Response, cookie: str) -> None:
    resp.set_cookie(COOKIE, cookie, max_age=sessions_of(request).max_age, httponly=True, samesite="lax",
                    secure=request.url.scheme == "https", path="/")


def not_found(request: Request, who: Viewer, what: str) -> Response:
    return render(request, who, "error.html", {"title": "Not found", "message": what}, status=404)


def _job_id(text: str) -> str:
    if not (1 <= len(text) <= 32) or not set(text) <= JOB_ID_CHARS:
        raise NotFound(f"no job {text!r}")
    return text


# ---- login ----------------------------------------------------------------------------------------

@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:
    return render(request, login_viewer(request), "login.html", {"next": _local(next), "error": None})


@router.post("/login")
def login_post(request: Request, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/",
               csrf: Annotated[str, Form()] = "") -> Response:
    # The form's token must match the browser's session (a signed-out one, made by GET /login): a page
    # on another site cannot sign a visitor in with a key of its own choosing (login CSRF).
    try:
        check_csrf(request, login_viewer(request, create=False), csrf)
    except CsrfFailed:  # a stale form (another tab signed in, the session expired): a fresh one
        return render(request, login_viewer(request), "login.html",
                      {"next": _local(next), "error": "This form was out of date: sign in again."}, status=403)
    cookie = login(request, key)
    if cookie is None:
        return render(request, login_viewer(request), "login.html",
                      {"next": _local(next), "error": "That key is not valid."}, status=401)
    resp = RedirectResponse(_local(next), status_code=303)
    set_session(request, resp, cookie)
    return resp


@router.post("/logout")
def logout(request: Request, who: ViewerDep, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, who, csrf)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


def _local(path: str) -> str:
    """Only a path on this server is a place to go back to after login (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


# ---- jobs -----------------------------------------------------------------------------------------

@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, who: ViewerDep, status: str = "", kind: str = "", model: str = "",
              schedule: str = "", before: str = "") -> Response:
    client = api_of(request).client
    f = data.JobFilter(status, kind, model, schedule)
    try:
        with client.db.session() as s:
            jobs, cursor = data.list_jobs(s, f, before=before)
    except (SpecError, ValueError) as e:
        return render(request, who, "error.html", {"title": "Bad filter", "message": str(e)}, status=400)
    models = sorted({m["name"] for m in client.models()})
    schedules = [v["name"] for v in admin.schedule_views(client.db)]
    more = "?" + urlencode({**f.query(), "before": cursor}) if cursor else ""
    return render(request, who, "jobs.html", {
        "jobs": jobs, "filter": f, "statuses": [s.value for s in JobStatus], "kinds": data.JOB_KINDS,
        "models": models, "schedules": schedules, "more": more, "title": "Jobs"})


@router.get("/ui/progress")
def progress(request: Request, who: ViewerDep, id: Annotated[list[str] | None, Query()] = None) -> JSONResponse:
    """Status and counts of up to 100 jobs, polled by the pages' progress bars."""
    client = api_of(request).client
    out: dict[str, Any] = {}
    with client.db.session() as s:
        for job_id in (id or [])[:100]:
            try:
                v = job_view(s, _job_id(job_id))
            except NotFound:
                continue
            out[v.id] = {"status": v.status.value, "counts": v.counts, "total": v.item_count, "done": v.done,
                         "final": v.final, "progress": v.progress}
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, who: ViewerDep, job_id: str, after: int | None = None,
             before: int | None = None) -> Response:
    client = api_of(request).client
    size = settings_of(request).page_size
    try:
        with client.db.session() as s:
            view = data.view_of(s, _job_id(job_id), client.store)
            rows, earlier, later = data.gallery_page(s, view.id, after=after, before=before, limit=size)
            failed = data.failures(s, view.id)
            events, events_total = data.recent_events(s, view.id)
    except NotFound as e:
        return not_found(request, who, str(e))
    cards = data.cards(rows, client.store)
    pages = {"prev": f"?before={cards[0].index}" if earlier and cards else "",
             "next": f"?after={cards[-1].index}" if later and cards else ""}
    return render(request, who, "job.html", {
        "job": view, "cards": cards, "pages": pages, "failures": failed, "events": events,
        "events_total": events_total, "title": f"Job {view.id[:8]}", "schedule": view.metadata.get("schedule")})


@router.post("/jobs/{job_id}/cancel")
def cancel(request: Request, who: ViewerDep, job_id: str, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, who, csrf)
    api_of(request).client.cancel(_job_id(job_id))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.post("/jobs/{job_id}/retry-failed")
def retry_failed(request: Request, who: ViewerDep, job_id: str, csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, who, csrf)
    api_of(request).client.retry_failed(_job_id(job_id))
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/items/{index}", response_class=HTMLResponse)
def item_page(request: Request, who: ViewerDep, job_id: str, index: int) -> Response:
    client = api_of(request).client
    try:
        with client.db.session() as s:
            item = data.item_detail(s, _job_id(job_id), index)
    except NotFound as e:
        return not_found(request, who, str(e))
    text = data.cards([(index, item["custom_id"], item["status"], item["prompt"], item["error"], item["key"],
                        item["media_type"], item["size"], item["duration_s"])], client.store,
                      text_bytes=200_000)[0].text
    return render(request, who, "item.html", {
        "item": item, "job_id": job_id, "text": text, "snippet": regenerate_snippet(item),
        "provenance_json": json.dumps(item["provenance"], indent=2, default=str), "title": f"Item {index}"})


def regenerate_snippet(item: dict[str, Any]) -> str:
    """Python that submits this one item again, same model version, effective parameters and seed (a
    one-item job's item 0 gets the job's seed, so ``seed=`` is the item's own)."""
    prov = item["provenance"]
    entry: dict[str, Any] = {"custom_id": item["custom_id"]}
    if item["messages"]:
        entry["messages"] = item["messages"]
    else:
        entry["prompt"] = item["prompt"]
    params = prov.get("params") or {**item["job"]["params"], **item["params"]}
    lines = [
        "from scheduler import Client",
        "",
        f"item = {_py(entry)}",
        f"params = {_py(params)}",
        "client = Client()  # AIGC_DATABASE_URL, AIGC_STORAGE_URL, ... as for the original job",
        f"job = client.submit({item['job']['kind']!r}, model={item['model_tag']!r}, items=[item],",
        f"                    params=params, seed={item['seed']})",
        "view = client.wait(job.id)",
        "print(next(iter(client.results(view.id))).uri)",
    ]
    return "\n".join(lines)


def _py(value: Any) -> str:
    """Python literal of a JSON value; a long dict one key a line, to fit a narrow box."""
    value = json.loads(json.dumps(value, default=str))
    flat = repr(value)
    if not isinstance(value, dict) or len(flat) <= 80:
        return flat
    return "{\n" + "".join(f"    {k!r}: {pprint.pformat(v, width=80)},\n" for k, v in value.items()) + "}"


# ---- models and schedules --------------------------------------------------------------------------

@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, who: ViewerDep) -> Response:
    models = api_of(request).client.models()
    return render(request, who, "models.html", {"models": models, "graph": data.model_graph(models),
                                                "title": "Models"})


@router.get("/schedules", response_class=HTMLResponse)
def schedules_page(request: Request, who: ViewerDep) -> Response:
    db = api_of(request).client.db
    rows = [admin.schedule_detail(db, v["name"], runs=8) for v in admin.schedule_views(db)]
    return render(request, who, "schedules.html", {"schedules": rows, "title": "Schedules"})


@router.post("/schedules/{name}/{action}")
def schedule_action(request: Request, who: ViewerDep, name: str, action: str,
                    csrf: Annotated[str, Form()] = "") -> Response:
    check_csrf(request, who, csrf)
    db = api_of(request).client.db
    if action == "pause":
        admin.pause(db, name)
    elif action == "resume":
        admin.resume(db, name)
    else:
        return not_found(request, who, f"no action {action!r}")
    return RedirectResponse("/schedules", status_code=303)


# ---- formatting helpers for the templates ----------------------------------------------------------

def age(when: datetime | str | None) -> str:
    if when is None:
        return ""
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)  # SQLite hands timestamps back naive; they are stored in UTC
    s = int((datetime.now(UTC) - when).total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{max(s, 0)}s ago"


def pct(n: int, total: int) -> float:
    return round(100.0 * n / total, 2) if total else 0.0


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


templates.env.globals.update(age=age, pct=pct, fmt_bytes=fmt_bytes)
