"""``aigc demo``: train the tiny news model once (cached), register it, and run a bulk job in-process."""

from __future__ import annotations

import hashlib
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aigc_core.registry import dir_digest
from aigc_core.settings import Settings

DEMO_MODEL = "demo-news"
# Bump when the recipe changes, so a cached model from an older recipe is rebuilt.
# A fixed number of steps, so the model is the same on a busy machine; the time cap is only a guard.
RECIPE = {"version": 2, "vocab_size": 4096, "n_layer": 2, "n_embd": 128, "n_head": 4, "n_positions": 256,
          "learning_rate": 3e-3, "batch_size": 16, "block_size": 96, "max_steps": 500, "max_seconds": 240.0,
          "seed": 0}
DEMO_PARAMS = {"max_new_tokens": 120, "temperature": 0.7, "top_k": 40, "repetition_penalty": 1.15, "echo": True}


def corpus_texts() -> list[str]:
    """The shipped corpus of news-style articles written for this project."""
    raw = resources.files("aigc_models").joinpath("data/news_corpus.jsonl").read_text(encoding="utf-8")
    docs = [json.loads(line) for line in raw.splitlines() if line.strip()]
    return [f"Headline: {d['headline']}\n\n{d['body']}" for d in docs]


def demo_headlines() -> list[str]:
    raw = resources.files("aigc_models").joinpath("data/demo_headlines.txt").read_text(encoding="utf-8")
    return [h for h in raw.splitlines() if h.strip()]


def build_demo_model(cache_dir: Path, console: Console | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Train tokenizer + tiny GPT-2 on the corpus; cached by corpus and recipe digest."""
    import torch

    from aigc_models.train_text import TrainConfig, save, tiny_gpt2, train_causal_lm, train_tokenizer

    texts = corpus_texts()
    key = hashlib.sha256(json.dumps([RECIPE, texts]).encode()).hexdigest()[:16]
    out = cache_dir / "models" / DEMO_MODEL / key
    if (out / "model.safetensors").exists():
        return out, None
    torch.manual_seed(RECIPE["seed"])
    tok = train_tokenizer(texts, vocab_size=RECIPE["vocab_size"])
    model = tiny_gpt2(tok, n_layer=RECIPE["n_layer"], n_embd=RECIPE["n_embd"], n_head=RECIPE["n_head"],
                      n_positions=RECIPE["n_positions"], seed=RECIPE["seed"])
    cfg = TrainConfig(learning_rate=RECIPE["learning_rate"], batch_size=RECIPE["batch_size"],
                      block_size=RECIPE["block_size"], max_steps=RECIPE["max_steps"],
                      max_seconds=RECIPE["max_seconds"],
                      early_stopping=False, eval_every=100, seed=RECIPE["seed"])
    if console:
        console.print(f"training the demo model ({sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"{len(texts)} articles, {cfg.max_steps} steps, about a minute on 2 cores; cached afterwards)")

    def show(m: dict[str, Any]) -> None:
        if console:
            console.print(f"  step {m['step']:4d}  train loss {m['loss']:.2f}  held-out loss {m['eval_loss']:.2f}")

    metrics = train_causal_lm(model, tok, texts, cfg, on_eval=show)
    tmp = out.with_name(out.name + ".partial")
    save(model, tok, tmp)
    (tmp / "training.json").write_text(json.dumps({"recipe": RECIPE, "metrics": metrics}, indent=1))
    tmp.rename(out)
    return out, metrics


def run_demo(settings: Settings, n_items: int = 200, max_new_tokens: int = 120,
             console: Console | None = None) -> dict[str, Any]:
    """The whole path with no servers: SQLite, a local folder, the in-process worker."""
    from scheduler.client import Client

    console = console or Console()
    settings = settings.model_copy(update={"broker_url": None})
    t0 = time.perf_counter()
    path, metrics = build_demo_model(settings.cache_dir, console)
    t_model = time.perf_counter() - t0
    client = Client(settings)
    ref = _ensure_registered(client, path)
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
               "items_per_s": round(n_items / t_job, 1), "manifest": view.manifest_uri,
               "training": metrics}
    _print_summary(console, summary, results, client)
    return summary


def _ensure_registered(client, path: Path):
    digest = dir_digest(path)
    current = [m for m in client.models() if m["name"] == DEMO_MODEL]
    if current and current[-1]["digest"] == digest:
        return client.model(f"{DEMO_MODEL}@{current[-1]['version']}")
    lineage = json.loads((path / "training.json").read_text()) if (path / "training.json").exists() else {}
    return client.register_model(DEMO_MODEL, "text", path.as_uri(), digest=digest, lineage=lineage)


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
        console.print(f"\n[bold]{ok[0].custom_id}[/bold] ({ok[0].uri}):\n")
        console.print(client.store.get(ok[0].key).decode(), highlight=False, markup=False)
