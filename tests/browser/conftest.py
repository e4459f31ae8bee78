"""A real dashboard to drive: ``aigc serve`` in a subprocess on a free loopback port over an embedded SQLite
database and a local store holding real jobs (text on the tiny GPT-2, images on ``demo-digits``, audio on
``espeak-en``, run to the end with the embedded Client's ``wait``), and Debian's chromium under Playwright.

Screenshots go to ``build/browser-artifacts/`` (``AIGC_BROWSER_ARTIFACTS`` moves them)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aigc_core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("AIGC_BROWSER_ARTIFACTS", ROOT / "build" / "browser-artifacts"))
AIGC = Path(sys.executable).parent / "aigc"
TEXT_PROMPTS = ["Headline: Council approves the new river bridge",
                "Headline: Rain expected over the weekend",
                "Headline: Local team wins the regional final"]
VOICE_LINES = ["Good morning. Here is the news at seven.", "Traffic is light on the ring road.",
               "And now, the weather: sunny and mild."]


@dataclass
class Site:
    """The running server, the embedded client writing to the same database and the jobs made for the tests."""

    url: str
    key: str
    client: Any
    settings: Settings
    jobs: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does it)")
    return path


@pytest.fixture(scope="session")
def site(tmp_path_factory, tiny_text_model) -> Iterator[Site]:
    from scheduler import Client
    from scheduler.api.keys import create_key

    tmp = tmp_path_factory.mktemp("dashboard")
    settings = Settings(database_url=f"sqlite:///{tmp}/aigc.db", storage_url=f"file://{tmp}/data",
                        cache_dir=tmp / "cache", broker_url=None, chunk_size=4, micro_batch_size=2)
    client = Client(settings)
    client.register_model("tiny", "text", tiny_text_model.as_uri(), defaults={"max_new_tokens": 24})
    # A fine-tuned version with its lineage (same weights: the graph and the chain are what is tested).
    client.register_model("tiny-news", "text", tiny_text_model.as_uri(), digest=client.model("tiny").digest,
                          lineage={"base_model": "tiny@1", "dataset": "s3://corpus/house-news.jsonl",
                                   "dataset_sha256": "9f" * 32, "job_id": None,
                                   "hyperparameters": {"epochs": 1, "learning_rate": 5e-4}})
    jobs = {
        "text": client.submit("text", "tiny", [{"prompt": p} for p in TEXT_PROMPTS], seed=7).id,
        "image": client.submit("image", "demo-digits", [str(d) for d in range(10)], seed=11).id,
        "audio": client.submit("audio", "espeak-en", VOICE_LINES, seed=3).id,
        "finetuned": client.submit("text", "tiny-news", ["Headline: Harbour reopens"], seed=5).id,
    }
    for job_id in jobs.values():
        client.wait(job_id, timeout=300)
    key = create_key(client.db, "dashboard-tests")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env.update(AIGC_DATABASE_URL=settings.database_url, AIGC_STORAGE_URL=settings.storage_url,
               AIGC_CACHE_DIR=str(settings.cache_dir), AIGC_DASHBOARD_SECRET="browser-tests-secret")
    log = (tmp / "server.log").open("wb")
    proc = subprocess.Popen([str(AIGC), "serve", "--host", "127.0.0.1", "--port", str(port), "--log-level",
                             "warning"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/healthz", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"aigc serve did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    try:
        yield Site(url, key, client, settings, jobs)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True)
        yield b
        b.close()


@dataclass
class Watched:
    """A signed-in page whose console errors and uncaught exceptions fail the test."""

    page: Any
    errors: list[str]

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path


@pytest.fixture
def page(browser, site) -> Iterator[Watched]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=site.url)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
    pg.on("dialog", lambda d: d.accept())
    # Sign in the way a person does: the login form, which sets the session cookie.
    pg.goto("/login")
    pg.fill("input[name=key]", site.key)
    pg.click("button[type=submit]")
    pg.wait_for_url(f"{site.url}/")
    watched = Watched(pg, errors)
    yield watched
    context.close()
    assert errors == [], f"errors in the browser: {errors}"
