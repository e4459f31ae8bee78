"""The real ``aigc`` command line, run as a subprocess against an embedded SQLite database and folder store."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

AIGC = str(Path(sys.executable).parent / "aigc") if (Path(sys.executable).parent / "aigc").exists() \
    else shutil.which("aigc")


class Cli:
    """One embedded installation: its own database, object folder and cache."""

    def __init__(self, root: Path):
        self.root = root
        self.db_path = root / "a.db"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("AIGC_") and k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
        env.update(AIGC_DATABASE_URL=f"sqlite:///{self.db_path}", AIGC_STORAGE_URL=f"file://{root}/data",
                   AIGC_CACHE_DIR=str(root / "cache"))
        self.env = env

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([AIGC, *map(str, args)], env=self.env, cwd=self.root, capture_output=True,
                              text=True, timeout=timeout)

    def job_rows(self) -> int:
        if not self.db_path.exists():
            return 0
        with sqlite3.connect(self.db_path) as c:
            tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "jobs" not in tables:
                return 0
            return sum(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("jobs", "items", "chunks"))


def _register(cli: Cli, model_dir: Path) -> None:
    r = cli("models", "register", "tiny", model_dir.as_uri())
    assert r.returncode == 0, r.stderr
    assert "tiny@1" in r.stdout


@pytest.fixture(scope="module")
def cli(tmp_path_factory, tiny_text_model) -> Cli:
    """An installation with ``tiny`` registered, where no submit ever succeeds."""
    assert AIGC, "the aigc console script is not installed"
    c = Cli(tmp_path_factory.mktemp("cli"))
    _register(c, tiny_text_model)
    return c


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _clean_error(r: subprocess.CompletedProcess, code: int) -> str:
    """The exit code, no traceback, and the message with any wrapping undone (the one-line test checks that)."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert r.stderr.strip(), "no error message on stderr"
    return r.stderr.strip().replace("\n", "")


def test_malformed_jsonl_line_exits_2_naming_the_line_and_writes_no_job(cli):
    items = _write(cli.root / "bad.jsonl", ['{"custom_id": "a", "prompt": "x"}', '{"custom_id": "b", "prompt": "y"}',
                                            '{"custom_id": "c", prompt: z}', '{"custom_id": "d", "prompt": "w"}'])
    r = cli("submit", "--items", items, "--model", "tiny")
    line = _clean_error(r, 2)
    assert "line 3" in line and "bad.jsonl" in line
    assert cli.job_rows() == 0
    st = cli("status", "--json")
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout) == []


def test_jsonl_line_that_is_an_array_exits_2_naming_the_line(cli):
    items = _write(cli.root / "array.jsonl", ['{"prompt": "x"}', '["not", "an", "object"]'])
    line = _clean_error(cli("submit", "--items", items, "--model", "tiny"), 2)
    assert "line 2" in line and "list" in line
    assert cli.job_rows() == 0


def test_a_jsonl_line_that_is_not_utf8_exits_2_naming_the_line(cli):
    items = cli.root / "latin1.jsonl"
    items.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    line = _clean_error(cli("submit", "--items", items, "--model", "tiny"), 2)
    assert "line 2" in line and "UTF-8" in line
    assert cli.job_rows() == 0


def test_unknown_model_exits_2_naming_the_known_ones(cli):
    items = _write(cli.root / "ok.jsonl", ['{"prompt": "x"}'])
    line = _clean_error(cli("submit", "--items", items, "--model", "nope"), 2)
    assert "nope" in line and "tiny" in line
    assert cli.job_rows() == 0


def test_missing_items_file_exits_2(cli):
    line = _clean_error(cli("submit", "--items", cli.root / "missing.jsonl", "--model", "tiny"), 2)
    assert "missing.jsonl" in line
    assert cli.job_rows() == 0


def test_error_about_a_long_path_is_one_line_on_stderr(cli):
    # Log collectors and `2>err.txt; grep` see one line per error, however long the path.
    deep = cli.root / "a-rather-long-folder-name-for-nightly-items" / "another-level-of-folders-2024"
    deep.mkdir(parents=True)
    items = _write(deep / "bad.jsonl", ['{"prompt": "x"}', '{"prompt": "y"}', '{oops'])
    r = cli("submit", "--items", items, "--model", "tiny")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{r.stderr}"
    assert str(items) in lines[0] and "line 3" in lines[0]


def test_status_of_an_unknown_job_exits_1_with_not_found(cli):
    line = _clean_error(cli("status", "0" * 32), 1)
    assert "not found" in line and "0" * 32 in line


def test_submit_wait_results_and_download_of_a_good_job(tmp_path, tiny_text_model):
    cli = Cli(tmp_path)
    _register(cli, tiny_text_model)
    prompts = {"h1": "Headline: Rain in the city", "h2": "Headline: Markets rise", "h3": "Headline: New park"}
    items = _write(tmp_path / "ok.jsonl", [json.dumps({"custom_id": k, "prompt": v}) for k, v in prompts.items()])

    r = cli("submit", "--items", items, "--model", "tiny", "--param", "max_new_tokens=8", "--seed", "11")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    job_id = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", job_id), r.stdout

    w = cli("wait", job_id)
    assert w.returncode == 0, (w.stdout, w.stderr)
    assert "succeeded" in w.stdout

    res = cli("results", job_id, "--json")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert [x["index"] for x in lines] == [0, 1, 2]
    assert [x["custom_id"] for x in lines] == ["h1", "h2", "h3"]
    assert {x["status"] for x in lines} == {"succeeded"}
    assert all(x["uri"] and x["sha256"] and x["error"] is None for x in lines)

    dest = tmp_path / "download"
    d = cli("results", job_id, "--download", dest)
    assert d.returncode == 0, d.stderr
    manifest = [json.loads(x) for x in (dest / "manifest.jsonl").read_text().splitlines() if x.strip()]
    assert [(m["custom_id"], m["status"]) for m in manifest] == [("h1", "succeeded"), ("h2", "succeeded"),
                                                                  ("h3", "succeeded")]
    for m in manifest:
        out = dest / "items" / f"{m['index']:06d}.txt"
        assert hashlib.sha256(out.read_bytes()).hexdigest() == m["sha256"]
        sidecar = json.loads((dest / "items" / f"{m['index']:06d}.provenance.json").read_text())
        assert sidecar["custom_id"] == m["custom_id"] and sidecar["job_id"] == job_id

    st = cli("status", job_id, "--json")
    assert st.returncode == 0, st.stderr
    view = json.loads(st.stdout)
    assert view["status"] == "succeeded" and view["counts"]["succeeded"] == 3


def _job_params(cli: Cli, job_id: str) -> dict:
    with sqlite3.connect(cli.db_path) as c:
        return json.loads(c.execute("SELECT params FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])


def test_param_values_are_read_as_yaml_scalars_so_the_readmes_finetune_example_runs(tmp_path, tiny_text_model):
    cli = Cli(tmp_path)
    _register(cli, tiny_text_model)
    corpus = _write(tmp_path / "corpus.jsonl", [json.dumps({"text": f"Story {i}. " * 20}) for i in range(8)])
    r = cli("finetune", "--base", "tiny", "--dataset", corpus, "--output", "house-news",
            "-p", "epochs=2", "-p", "learning_rate=5e-4", "-p", "max_steps=20", "-p", "lora=false")
    assert r.returncode == 0, r.stderr
    hp = _job_params(cli, r.stdout.strip())["hyperparameters"]
    assert hp["learning_rate"] == 5e-4 and hp["max_steps"] == 20 and hp["epochs"] == 2.0 and hp["lora"] is False


def test_parse_params_keeps_text_as_text_and_types_numbers():
    from scheduler.cli import _parse_params

    got = _parse_params(["temperature=7e-1", "max_new_tokens=20", "echo=true", "voice=en-us",
                         "negative_prompt=blurry: dark", "n='20'"])
    assert got == {"temperature": 0.7, "max_new_tokens": 20, "echo": True, "voice": "en-us",
                   "negative_prompt": "blurry: dark", "n": "20"}
