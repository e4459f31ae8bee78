"""``aigc demo``: build the demo news model through a fine-tuning job (once, cached), then a bulk job."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aigc_core.errors import AigcError
from aigc_core.registry import dir_digest
from aigc_core.settings import Settings

DEMO_MODEL = "demo-news"
BASE_MODEL = "demo-news-base"
# The base: a tokenizer trained on the corpus and a randomly initialised 2-layer GPT-2.
BASE_RECIPE = {"version": 2, "vocab_size": 4096, "n_layer": 2, "n_embd": 128, "n_head": 4,
               "n_positions": 256, "seed": 0}
# A fixed number of steps, so the model is the same on a busy machine. The corpus is small and the
# model memorises it (held-out loss rises after ~100 steps); the last weights, not the best-eval
# ones, are kept because memorised phrases are what make its text read like news.
HYPERPARAMETERS = {"epochs": 100, "max_steps": 500, "learning_rate": 3e-3, "batch_size": 16, "block_size": 96,
                   "val_fraction": 0.1, "eval_every": 100, "patience": 0, "checkpoint_every": 250,
                   "warmup_steps": 20, "keep_best": False, "max_seconds": 900}
DEMO_PARAMS = {"max_new_tokens": 120, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.15, "echo": True}


def corpus_texts() -> list[str]:
    """The shipped corpus of news-style articles written for this project."""
    raw = resources.files("aigc_models").joinpath("data/news_corpus.jsonl").read_text(encoding="utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return [f"Headline: {d['headline']}\n\n{d['body']}" for d in docs]


def demo_headlines() -> list[str]:
    raw = resources.files("aigc_models").joinpath("data/demo_headlines.txt").read_text(encoding="utf-8")
    return [h for h in raw.splitlines() if h.strip()]


def _key(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps([BASE_RECIPE, HYPERPARAMETERS, texts]).encode()).hexdigest()[:16]


def build_base(out: Path, texts: list[str]) -> Path:
    from aigc_models.tiny_text import save, tiny_gpt2, train_tokenizer

    if (out / "model.safetensors").exists():
        return out
    r = BASE_RECIPE
    tok = train_tokenizer(texts, vocab_size=r["vocab_size"])
    model = tiny_gpt2(tok, n_layer=r["n_layer"], n_embd=r["n_embd"], n_head=r["n_head"],
                      n_positions=r["n_positions"], seed=r["seed"])
    tmp = out.with_name(out.name + ".partial")
    save(model, tok, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def ensure_demo_model(client, console: Console, *, upload: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """``demo-news``: from the cache when this recipe was trained before, else by a fine-tuning job.
    ``upload``: a shared deployment, where models are registered in the object store (see ``_register``)."""
    texts = corpus_texts()
    key = _key(texts)
    cache = client.settings.cache_dir / "models"
    cached = cache / DEMO_MODEL / key
    if (cached / "model.safetensors").exists():
        # Beside the folder, not in it: the folder's digest is then the trained model's, so a second run
        # finds that version instead of registering the same weights again (a cache written before kept
        # it inside).
        lineage_file = _lineage_file(cached) if _lineage_file(cached).exists() else cached / "lineage.json"
        lineage = json.loads(lineage_file.read_text())
        return _register(client, DEMO_MODEL, cached, lineage, upload=upload), None
    base_ref = _register(client, BASE_MODEL, build_base(cache / BASE_MODEL / key, texts), {"recipe": BASE_RECIPE},
                         upload=upload)
    dataset = client.settings.cache_dir / "datasets" / f"news_corpus-{key}.jsonl"
    dataset.parent.mkdir(parents=True, exist_ok=True)
    dataset.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    console.print(f"training {DEMO_MODEL} from {base_ref.tag} on {len(texts)} articles: a fine-tuning job of "
                  f"{HYPERPARAMETERS['max_steps']} steps, about a minute on 2 cores (cached afterwards)")
    ft = client.finetune(base_ref.tag, dataset, DEMO_MODEL, HYPERPARAMETERS, idempotency_key=f"demo:{key}:"
                         f"{base_ref.tag}")
    view = client.wait(ft.id, progress=True)
    for e in client.events(ft.id):
        if e["type"] == "train":
            console.print(f"  step {e['step']:4d}  train loss {e['loss']:.2f}  held-out loss {e['eval_loss']:.2f}")
    if view.status.value != "succeeded":
        raise SystemExit(f"the demo fine-tuning job {ft.id} ended {view.status.value}: "
                         f"{[r.error for r in client.results(ft.id)]}")
    (card,) = list(client.results(ft.id))
    model = json.loads(client.store.get(card.key))
    ref = client.model(model["model"])
    _copy_to_cache(client, ref, cached, model["lineage"])
    return ref, model["lineage"]["metrics"]


def _copy_to_cache(client, ref, dest: Path, lineage: dict[str, Any]) -> None:
    from aigc_core.registry import materialize

    src = materialize(ref, client.settings.cache_dir, endpoint_url=client.settings.s3_endpoint_url)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".verified"))  # the s3 cache's marker
    _lineage_file(dest).write_text(json.dumps(lineage, indent=1, default=str))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _lineage_file(cached: Path) -> Path:
    return cached.with_name(cached.name + ".lineage.json")


def _register(client, name: str, path: Path, lineage: dict[str, Any], *, upload: bool = False):
    """The model in ``path`` as ``name``'s newest version (a new one only when its digest changed).

    Embedded, the registry points at ``path`` (file://). In a shared deployment (``upload``) a path on
    this host means nothing to a worker elsewhere: the files go to the object store under
    ``models/{name}/{digest}/``, registered by that s3:// URI, which every worker fetches and checks."""
    digest = dir_digest(path)
    current = [m for m in client.models() if m["name"] == name]
    if current and current[-1]["digest"] == digest and not (upload and current[-1]["uri"].startswith("file://")):
        return client.model(f"{name}@{current[-1]['version']}")
    uri = path.as_uri()
    if upload:
        prefix = f"models/{name}/{digest.removeprefix('sha256:')[:16]}"
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            key = f"{prefix}/{f.relative_to(path).as_posix()}"
            if not client.store.exists(key):
                client.store.upload(key, f)
        uri = client.store.uri(prefix)
    return client.register_model(name, "text", uri, digest=digest, lineage=lineage)


def shared_deployment(settings: Settings) -> list[str]:
    """The settings that make this a deployment other hosts share (empty: embedded)."""
    why = []
    if settings.broker_url:
        why.append("AIGC_BROKER_URL is set")
    if not settings.database_url.startswith("sqlite"):
        why.append("AIGC_DATABASE_URL is not SQLite")
    if not settings.storage_url.startswith("file://"):
        why.append("AIGC_STORAGE_URL is an object store")
    return why


def run_demo(settings: Settings, n_items: int = 200, max_new_tokens: int = 120,
             console: Console | None = None) -> dict[str, Any]:
    """The whole path with no servers: SQLite, a local folder, the in-process worker.

    Writes news articles, draws a grid of digits with the GAN/VAE backend, and reads some of the
    articles aloud with espeak-ng: three modalities, one pipeline.
    """
    from scheduler.client import Client

    console = console or Console()
    shared = shared_deployment(settings)
    if shared and settings.storage_url.startswith("file://"):
        raise AigcError(f"aigc demo: {' and '.join(shared)}, so other hosts share this deployment, but "
                        f"AIGC_STORAGE_URL ({settings.storage_url}) is a folder on this host: workers elsewhere could "
                        "not load the demo models; set AIGC_STORAGE_URL=s3://bucket/prefix, or run the demo embedded "
                        "(without AIGC_BROKER_URL and AIGC_DATABASE_URL)")
    settings = settings.model_copy(update={"broker_url": None})  # the demo's jobs run in this process
    client = Client(settings)
    t0 = time.perf_counter()
    ref, metrics = ensure_demo_model(client, console, upload=bool(shared))
    parts: dict[str, dict[str, Any]] = {"model": {"seconds": round(time.perf_counter() - t0, 1)}}
    heads = demo_headlines()
    items = [{"custom_id": f"article-{i:04d}", "prompt": f"Headline: {heads[i % len(heads)]}\n\n"}
             for i in range(n_items)]
    params = {**DEMO_PARAMS, "max_new_tokens": max_new_tokens}
    text = client.submit("text", model=ref.tag, items=items, params=params, seed=7, metadata={"demo": True})
    console.print(f"submitted job {text.id}: {n_items} articles with {ref.tag}")
    parts["text"] = _timed(client, text.id, n_items)
    digits = client.submit("image", model="demo-digits", seed=7, params={"size": 64},
                           items=[{"custom_id": f"digit-{i:02d}", "params": {"digit": i % 10}} for i in range(20)])
    console.print(f"submitted job {digits.id}: 20 handwritten digits with demo-digits (a conditional VAE)")
    parts["image"] = _timed(client, digits.id, 20)
    grid = _digit_grid(client, digits.id)
    n_read = min(5, n_items)
    talk = client.submit("audio", model="espeak-en", params={"rate": 170},
                         items=[{"custom_id": f"read-{i:04d}",
                                 "from": {"job": text.id, "custom_id": f"article-{i:04d}"}}
                                for i in range(n_read)])
    console.print(f"submitted job {talk.id}: {n_read} articles read aloud by espeak-en")
    parts["audio"] = _timed(client, talk.id, n_read)
    results = list(client.results(text.id))
    summary = {"text_job": text.id, "model": ref.tag, "parts": parts, "training": metrics, "grid": grid,
               "manifest": client.status(text.id).manifest_uri,
               "audio": [r.uri for r in client.results(talk.id) if r.uri]}
    _print_summary(console, summary, results, client)
    return summary


def _timed(client, job_id: str, n: int) -> dict[str, Any]:
    t = time.perf_counter()
    view = client.wait(job_id, progress=True)
    secs = time.perf_counter() - t
    return {"job": job_id, "status": view.status.value, "counts": view.counts, "seconds": round(secs, 2),
            "items_per_s": round(n / secs, 1) if secs else None}


def _digit_grid(client, job_id: str) -> str:
    """The digits of a job side by side in one PNG next to its outputs."""
    import io

    from PIL import Image

    imgs = [Image.open(io.BytesIO(client.store.get(r.key))).convert("L") for r in client.results(job_id) if r.key]
    if not imgs:
        return "-"
    w, h = imgs[0].size
    cols = 10
    grid = Image.new("L", (cols * w, ((len(imgs) + cols - 1) // cols) * h))
    for i, im in enumerate(imgs):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return client.store.put(f"jobs/{job_id}/grid.png", buf.getvalue(), "image/png").uri


def _print_summary(console: Console, s: dict[str, Any], results, client) -> None:
    t = Table(title="aigc demo", show_header=True)
    for col in ("part", "job", "status", "items", "seconds", "items/s"):
        t.add_column(col)
    p = s["parts"]
    t.add_row("model " + s["model"], "-", "trained now" if s["training"] else "cached", "-",
              str(p["model"]["seconds"]), "-")
    for name in ("text", "image", "audio"):
        r = p[name]
        c = r["counts"]
        t.add_row(name, r["job"][:8], r["status"], f"{c['succeeded']} ok, {c['failed']} failed", str(r["seconds"]),
                  str(r["items_per_s"]))
    console.print(t)
    for label, value in (("articles", results[0].uri.rsplit("/", 1)[0] if results and results[0].uri else "-"),
                         ("manifest", s["manifest"]), ("digits", s["grid"]),
                         ("speech", s["audio"][0] if s["audio"] else "-")):
        console.print(f"{label + ':':10}{value}", highlight=False, soft_wrap=True)
    ok = [r for r in results if r.uri]
    if ok:
        console.print(f"\n[bold]{ok[0].custom_id}[/bold]:\n", soft_wrap=True)
        console.print(client.store.get(ok[0].key).decode(), highlight=False, markup=False)
