"""What the pages read: jobs by filter, a gallery page by keyset, one item with its lineage, the model graph.
Counts and job state come from ``aigc_core.jobs.job_view``; only the paging queries are new here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aigc_core.errors import NotFound, SpecError
from aigc_core.jobs import JobView, job_prefix, job_view
from aigc_core.registry import parse_name
from aigc_core.schema import Artifact, Item, ItemStatus, Job, JobEvent, JobStatus, Model
from aigc_core.storage import ObjectStore

JOB_KINDS = ("text", "image", "audio", "finetune")
JOBS_PAGE = 50


@dataclass(frozen=True)
class JobFilter:
    status: str = ""
    kind: str = ""
    model: str = ""
    schedule: str = ""

    def query(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v}


def list_jobs(s: Session, f: JobFilter, *, before: str = "", limit: int = JOBS_PAGE) -> tuple[list[JobView], str]:
    """Newest first, ``limit`` at a time; ``before`` is the cursor the previous page returned."""
    q = select(Job.id, Job.created_at).order_by(Job.created_at.desc(), Job.id.desc())
    if f.status:
        q = q.where(Job.status == JobStatus(f.status))
    if f.kind:
        q = q.where(Job.kind == f.kind)
    if f.model:
        name, version = parse_name(f.model)
        q = q.where(Job.model_name == name)
        if version is not None:
            q = q.where(Job.model_version == version)
    if f.schedule:
        q = q.where(Job.meta["schedule"].as_string() == f.schedule)
    if before:
        at, _, job_id = before.partition("_")
        try:
            ts = datetime.fromisoformat(at)
        except ValueError:
            raise SpecError(f"bad cursor {before!r}") from None
        q = q.where((Job.created_at < ts) | ((Job.created_at == ts) & (Job.id < job_id)))
    rows = s.execute(q.limit(limit + 1)).all()
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = f"{rows[-1].created_at.isoformat()}_{rows[-1].id}" if more and rows else ""
    return [view_of(s, r.id) for r in rows], cursor


def view_of(s: Session, job_id: str, store: ObjectStore | None = None) -> JobView:
    """``job_view``, except that a finished job's counts are the ones stored when it finished: a page
    listing fifty 100,000-item jobs does not count five million items again."""
    job = s.get(Job, job_id)
    if job is None or job.finished_at is None or job.succeeded_items is None or job.kind == "finetune":
        return job_view(s, job_id, store)
    counts = {st.value: 0 for st in ItemStatus}
    counts.update(succeeded=job.succeeded_items, failed=job.failed_items or 0, cancelled=job.cancelled_items or 0,
                  reused=job.reused_items or 0)
    version = job.model_version if job.model_version is not None else "?"
    manifest = store.uri(f"{job_prefix(job_id)}/manifest.jsonl") if store else None
    return JobView(job.id, job.kind, f"{job.model_name}@{version}", job.status, counts, job.item_count,
                   job.created_at, job.started_at, job.finished_at, dict(job.meta or {}), manifest)


@dataclass(frozen=True)
class Card:
    """One gallery entry: an item and, if it succeeded, its output."""

    index: int
    custom_id: str
    status: str
    prompt: str
    error: str | None
    media_type: str | None
    size: int | None
    duration_s: float | None
    text: str | None = None  # the output itself, for text items (read from the store)

    @property
    def family(self) -> str:
        mt = self.media_type or ""
        return mt.split("/", 1)[0] if mt else "none"


def gallery_page(s: Session, job_id: str, *, after: int | None, before: int | None,
                 limit: int) -> tuple[list[tuple[Any, ...]], bool, bool]:
    """Rows of one page by (job_id, index) keyset: the same cost on page 1 of 10 items as on page 2,000
    of 100,000. Returns the rows, whether there is an earlier page and whether there is a later one."""
    cols = (Item.index, Item.custom_id, Item.status, Item.prompt, Item.error, Artifact.key, Artifact.media_type,
            Artifact.size, Artifact.duration_s)
    q = select(*cols).outerjoin(Artifact, Artifact.item_id == Item.id).where(Item.job_id == job_id)
    if before is not None:
        rows = list(reversed(s.execute(q.where(Item.index < before).order_by(Item.index.desc())
                                       .limit(limit + 1)).all()))
        earlier = len(rows) > limit
        rows = rows[-limit:] if earlier else rows
        return [tuple(r) for r in rows], earlier, True
    start = -1 if after is None else after
    page = s.execute(q.where(Item.index > start).order_by(Item.index).limit(limit + 1)).all()
    later = len(page) > limit
    return [tuple(r) for r in page[:limit]], start >= 0, later


def cards(rows: list[tuple[Any, ...]], store: ObjectStore, *, text_bytes: int = 4000) -> list[Card]:
    out = []
    for index, custom_id, status, prompt, error, key, media_type, size, duration in rows:
        text = None
        if key and (media_type or "").startswith(("text/", "application/json")):
            try:
                # Decoded whole, then cut: a cut through a multi-byte character is not shown as garbage.
                text = store.get(key).decode("utf-8", "replace")[:text_bytes]
            except Exception as e:  # a missing object shows as such; the page still renders
                text = f"(output unreadable: {e})"
        out.append(Card(index, custom_id, status.value if hasattr(status, "value") else str(status), prompt,
                        error, media_type, size, duration, text))
    return out


def failures(s: Session, job_id: str, limit: int = 50) -> list[tuple[int, str, str | None, int]]:
    rows = s.execute(select(Item.index, Item.custom_id, Item.error, Item.attempts)
                     .where(Item.job_id == job_id, Item.status == ItemStatus.failed)
                     .order_by(Item.index).limit(limit)).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def recent_events(s: Session, job_id: str, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
    """The newest ``limit`` events, oldest first, and how many there are in all (a fine-tuning run logs
    one per step, so ``Client.events``, which reads them all, is not for a page)."""
    rows = list(s.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id.desc())
                          .limit(limit)))
    total = len(rows) if len(rows) < limit else int(s.scalar(select(func.count()).where(JobEvent.job_id == job_id)
                                                               .select_from(JobEvent)) or 0)
    return [{"at": e.at.isoformat(), "type": e.type, **(e.data or {})} for e in reversed(rows)], total


def item_detail(s: Session, job_id: str, index: int) -> dict[str, Any]:
    row = s.execute(select(Item, Artifact).outerjoin(Artifact, Artifact.item_id == Item.id)
                    .where(Item.job_id == job_id, Item.index == index)).first()
    if row is None:
        raise NotFound(f"no item {index} in job {job_id}")
    item, art = row
    job = s.get(Job, job_id)
    assert job is not None
    prov = dict(art.provenance or {}) if art else {}
    model = prov.get("model") or {}
    tag = f"{model['name']}@{model['version']}" if model.get("name") else \
        f"{job.model_name}@{job.model_version}" if job.model_version is not None else job.model_name
    return {
        "index": item.index, "custom_id": item.custom_id, "status": item.status.value, "prompt": item.prompt,
        "messages": item.messages, "source": item.source, "params": item.params, "seed": item.seed,
        "attempts": item.attempts, "worker": item.worker or prov.get("worker"), "error": item.error,
        "started_at": item.started_at, "finished_at": item.finished_at,
        "key": art.key if art else None, "uri": art.uri if art else None, "sha256": art.sha256 if art else None,
        "size": art.size if art else None, "media_type": art.media_type if art else None,
        "duration_s": art.duration_s if art else None, "provenance": prov, "model_tag": tag,
        "job": {"id": job.id, "kind": job.kind, "seed": job.seed, "params": job.params},
        "lineage": lineage_chain(s, tag),
    }


def lineage_chain(s: Session, tag: str, depth: int = 20) -> list[dict[str, Any]]:
    """The model version, then the base it was fine-tuned from, and so on up to a model with no lineage;
    each step with its weights digest and the dataset it was trained on."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    while tag and tag not in seen and len(chain) < depth:
        seen.add(tag)
        try:
            name, version = parse_name(tag)
        except SpecError:
            break
        q = select(Model).where(Model.name == name)
        q = q.where(Model.version == version) if version is not None else q.order_by(Model.version.desc())
        m = s.scalars(q.limit(1)).first()
        if m is None:
            chain.append({"tag": tag, "missing": True})
            break
        lin = dict(m.lineage or {})
        chain.append({"tag": f"{m.name}@{m.version}", "uri": m.uri, "digest": m.digest, "revision": m.revision,
                      "backend": m.backend, "base": lin.get("base_model"), "dataset": lin.get("dataset"),
                      "dataset_sha256": lin.get("dataset_sha256"), "job_id": lin.get("job_id"),
                      "hyperparameters": lin.get("hyperparameters"), "metrics": lin.get("metrics")})
        tag = lin.get("base_model") or ""
    return chain


# ---- the model graph ----------------------------------------------------------------------------

NODE_W, NODE_H, COL_W, ROW_H = 190, 44, 250, 64


def model_graph(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes (model versions and the datasets they were trained on) placed in columns by lineage depth,
    and edges: fine-tuned from (solid, through its dataset) and next version of the same name (dashed)."""
    tags = {m["tag"]: m for m in models}
    parents: dict[str, list[tuple[str, str]]] = {}
    datasets: dict[str, str] = {}
    by_name: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_name.setdefault(m["name"], []).append(m)
    for m in models:
        lin = m.get("lineage") or {}
        base = lin.get("base_model")
        if base:
            parents.setdefault(m["tag"], []).append((base, "finetune"))
            tags.setdefault(base, {"tag": base, "name": base.split("@")[0], "kind": "?", "missing": True})
            if lin.get("dataset"):
                ds = f"dataset {str(lin.get('dataset_sha256') or lin['dataset'])[:12]}"
                datasets[ds] = str(lin["dataset"])
                parents[m["tag"]].append((ds, "dataset"))
    for versions in by_name.values():
        versions.sort(key=lambda m: m["version"])
        for a, b in pairwise(versions):
            if not (b.get("lineage") or {}).get("base_model"):
                parents.setdefault(b["tag"], []).append((a["tag"], "version"))
    depth: dict[str, int] = {}

    def depth_of(node: str, trail: frozenset[str] = frozenset()) -> int:
        if node in depth:
            return depth[node]
        ps = [p for p, _ in parents.get(node, []) if p not in trail]
        d = 1 + max((depth_of(p, trail | {node}) for p in ps), default=-1)
        depth[node] = d
        return d

    nodes = [*tags, *datasets]
    for n in nodes:
        depth_of(n)
    columns: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda n: (depth[n], n)):
        columns.setdefault(depth[n], []).append(n)
    pos = {n: (20 + d * COL_W, 20 + i * ROW_H) for d, col in columns.items() for i, n in enumerate(col)}
    out_nodes = [{"id": n, "x": x, "y": y, "dataset": n in datasets, "title": datasets.get(n) or n,
                  "kind": tags[n].get("kind", "") if n in tags else "dataset",
                  "missing": bool(tags.get(n, {}).get("missing"))} for n, (x, y) in pos.items()]
    edges = []
    for child, ps in parents.items():
        for p, how in ps:
            if p in pos and child in pos:
                (x1, y1), (x2, y2) = pos[p], pos[child]
                edges.append({"x1": x1 + NODE_W, "y1": y1 + NODE_H // 2, "x2": x2, "y2": y2 + NODE_H // 2,
                              "how": how})
    width = 40 + (max(columns, default=0) + 1) * COL_W
    height = 40 + max((len(c) for c in columns.values()), default=1) * ROW_H
    return {"nodes": out_nodes, "edges": edges, "width": width, "height": height, "w": NODE_W, "h": NODE_H}
