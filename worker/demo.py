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
    from aigc_models.train_text import save, tiny_gpt2, train_tokenizer

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


def ensure_demo_model(client, console: Console) -> tuple[Any, dict[str, Any] | None]:
    """``demo-news``: from the cache when this recipe was trained before, else by a fine-tuning job."""
    texts = corpus_texts()
    key = _key(texts)
    cache = client.settings.cache_dir / "models"
    cached = cache / DEMO_MODEL / key
    if (cached / "model.safetensors").exists():
        return _register(client, DEMO_MODEL, cached, json.loads((cached / "lineage.json").read_text())), None
    base_ref = _register(client, BASE_MODEL, build_base(cache / BASE_MODEL / key, texts), {"recipe": BASE_RECIPE})
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
    shutil.copytree(src, tmp)
    (tmp / "lineage.json").write_text(json.dumps(lineage, indent=1, default=str))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _register(client, name: str, path: Path, lineage: dict[str, Any]):
    digest = dir_digest(path)
    current = [m for m in client.models() if m["name"] == name]
    if current and current[-1]["digest"] == digest:
        return client.model(f"{name}@{current[-1]['version']}")
    return client.register_model(name, "text", path.as_uri(), digest=digest, lineage=lineage)


def run_demo(settings: Settings, n_items: int = 200, max_new_tokens: int = 120,
             console: Console | None = None) -> dict[str, Any]:
    """The whole path with no servers: SQLite, a local folder, the in-process worker."""
    from scheduler.client import Client

    console = console or Console()
    settings = settings.model_copy(update={"broker_url": None})
    client = Client(settings)
    t0 = time.perf_counter()
    ref, metrics = ensure_demo_model(client, console)
    t_model = time.perf_counter() - t0
    heads = demo_headlines()
    items = [{"custom_id": f"article-{i:04d}", "prompt": f"Headline: {heads[i % len(heads)]}\n\n"}
             for i in range(n_items)]
    params = {**DEMO_PARAMS, "max_new_tokens": max_new_tokens}
    job = client.submit("text", model=ref.tag, items=items, params=params, seed=7, metadata={"demo": True})
    console.print(f"submitted job {job.id}: {n_items} articles with {ref.tag}")
    t1 = time.perf_counter()
    view = client.wait(job.id, progress=True)
    t_job = time.perf_counter() - t1
    results = list(client.results(job.id))
    summary = {"job_id": job.id, "status": view.status.value, "counts": view.counts, "model": ref.tag,
               "model_seconds": round(t_model, 1), "job_seconds": round(t_job, 2),
               "items_per_s": round(n_items / t_job, 1), "manifest": view.manifest_uri, "training": metrics}
    _print_summary(console, summary, results, client)
    return summary


def _print_summary(console: Console, s: dict[str, Any], results, client) -> None:
    t = Table(title="aigc demo", show_header=False)
    for k in ("job_id", "status", "model"):
        t.add_row(k, str(s[k]))
    c = s["counts"]
    t.add_row("items", f"{c['succeeded']} succeeded, {c['failed']} failed")
    t.add_row("model ready in", f"{s['model_seconds']} s" + (" (trained now)" if s["training"] else " (cached)"))
    t.add_row("job wall time", f"{s['job_seconds']} s ({s['items_per_s']} items/s)")
    console.print(t)
    console.print(f"outputs:  {results[0].uri.rsplit('/', 1)[0] if results and results[0].uri else '-'}",
                  highlight=False, soft_wrap=True)
    console.print(f"manifest: {s['manifest']}", highlight=False, soft_wrap=True)
    ok = [r for r in results if r.uri]
    if ok:
        console.print(f"\n[bold]{ok[0].custom_id}[/bold] ({ok[0].uri}):\n", soft_wrap=True)
        console.print(client.store.get(ok[0].key).decode(), highlight=False, markup=False)
