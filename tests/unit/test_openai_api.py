"""The Batch API's request parsing, and ``aigc keys`` / ``aigc serve`` on an embedded SQLite database
(the SDK-driven tests with real servers are in tests/integration/test_openai_api.py)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.api.requests import CHAT, COMPLETIONS, parse_requests

AIGC = str(Path(sys.executable).parent / "aigc") if (Path(sys.executable).parent / "aigc").exists() \
    else (shutil.which("aigc") or "aigc")


def jsonl(*lines: dict) -> bytes:
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def req(cid: str, url: str = COMPLETIONS, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "m", **body}}


def test_completion_requests_map_onto_text_items_and_their_parameters():
    p = parse_requests(jsonl(req("a", prompt="Hi", max_tokens=5, temperature=0, top_p=0.5, stop="\n", seed=9),
                             req("b", prompt=["Yo"], echo=True, n=1, stream=False)), COMPLETIONS, {"m"}, 10)
    assert p.errors == [] and p.model == "m" and p.seed == 9 and p.lines == [1, 2]
    assert p.items == [
        {"custom_id": "a", "prompt": "Hi",
         "params": {"temperature": 0, "top_p": 0.5, "stop": "\n", "max_new_tokens": 5}},
        {"custom_id": "b", "prompt": "Yo", "params": {"echo": True}},
    ]


def test_chat_requests_become_messages_with_developer_read_as_system():
    p = parse_requests(jsonl(req("a", CHAT, max_completion_tokens=4, max_tokens=99, messages=[
        {"role": "developer", "content": "Short."}, {"role": "user", "content": [{"type": "text", "text": "Q"}]}])),
        CHAT, {"m"}, 10)
    assert p.errors == []
    assert p.items == [{"custom_id": "a", "params": {"max_new_tokens": 4},
                        "messages": [{"role": "system", "content": "Short."}, {"role": "user", "content": "Q"}]}]


def test_unsupported_fields_and_a_second_model_are_refused_with_their_lines():
    p = parse_requests(jsonl(req("a", prompt="x", n=2), req("b", prompt="x", tools=[]),
                             {**req("c", prompt="x"), "body": {"model": "m2", "prompt": "x"}},
                             req("d", CHAT, messages=[{"role": "tool", "content": "x"}])),
                       COMPLETIONS, {"m", "m2"}, 10)
    assert [(e["line"], e["code"], e["param"]) for e in p.errors] == [
        (1, "unsupported_value", "body.n"), (2, "unsupported_parameter", "body.tools"),
        (3, "mismatched_model", "body.model"), (4, "mismatched_url", "url"),
        (4, "unsupported_parameter", "body.messages"), (4, "invalid_value", "body.prompt")]


def test_too_many_requests_and_an_empty_file_are_errors():
    assert parse_requests(jsonl(*(req(str(i), prompt="x") for i in range(3))), COMPLETIONS, {"m"}, 2).errors[0][
        "code"] == "too_many_requests"
    assert parse_requests(b"\n\n", COMPLETIONS, {"m"}, 2).errors[0]["code"] == "empty_file"


@pytest.fixture
def aigc(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIGC_")}
    env.update(AIGC_DATABASE_URL=f"sqlite:///{tmp_path / 'a.db'}", AIGC_STORAGE_URL=f"file://{tmp_path}/data",
               AIGC_CACHE_DIR=str(tmp_path / "cache"))

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([AIGC, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)

    run.db = tmp_path / "a.db"  # type: ignore[attr-defined]
    return run


def test_keys_are_printed_once_stored_hashed_and_serve_needs_one(aigc):
    refused = aigc("serve", "--port", "1")
    assert refused.returncode != 0 and "aigc keys create" in refused.stderr + refused.stdout
    made = aigc("keys", "create", "nightly")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("sk-aigc-") and len(key) > 40
    listed = aigc("keys", "list")
    assert "nightly" in listed.stdout and key not in listed.stdout
    with sqlite3.connect(aigc.db) as c:
        rows = c.execute("select name, key_sha256 from api_keys").fetchall()
    from scheduler.api.keys import key_sha256

    assert rows == [("nightly", key_sha256(key))]
    assert aigc("keys", "create", "nightly").returncode != 0  # names are unique
    assert aigc("keys", "revoke", "nightly").returncode == 0
    assert aigc("keys", "revoke", "nightly").returncode != 0
    assert aigc("serve", "--port", "1").returncode != 0  # the only key is revoked
