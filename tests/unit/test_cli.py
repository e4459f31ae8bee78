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
        # No sidecars by default: written from the committed row, which says what made the output.
        prov = json.loads((dest / "items" / f"{m['index']:06d}.provenance.json").read_text())
        assert prov["custom_id"] == m["custom_id"] and prov["job_id"] == job_id
        assert prov["output"]["sha256"] == m["sha256"] and prov["seed"] == 11 + m["index"]
    assert not [k for k in (tmp_path / "data").rglob("*.provenance.json")]  # none in the store

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
    from scheduler.cli.root import _parse_params

    got = _parse_params(["temperature=7e-1", "max_new_tokens=20", "echo=true", "voice=en-us",
                         "negative_prompt=blurry: dark", "n='20'"])
    assert got == {"temperature": 0.7, "max_new_tokens": 20, "echo": True, "voice": "en-us",
                   "negative_prompt": "blurry: dark", "n": "20"}


# ---- exit codes, unreachable services, --version, broken pipes (issue 18) -------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_line(r: subprocess.CompletedProcess, code: int = 1) -> str:
    """One line on stderr, no rich traceback box, and the exit code."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "╭" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{r.stderr[-3000:]}"
    return lines[0]


def test_version_prints_the_package_name_and_version():
    from aigc_core import __version__

    r = subprocess.run([AIGC, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"aigc-runner {__version__}"


@pytest.mark.parametrize("args", [["status"], ["status", "0" * 32], ["submit", "--items", "i.jsonl", "--model", "x"],
                                  ["db", "upgrade"], ["models", "list"], ["schedules", "list"],
                                  ["results", "0" * 32], ["wait", "0" * 32]])
def test_an_unreachable_database_is_one_line_naming_it_with_the_password_masked(tmp_path, args):
    cli = Cli(tmp_path)
    _write(tmp_path / "i.jsonl", ['{"prompt": "x"}'])
    port = _free_port()
    cli.env["AIGC_DATABASE_URL"] = f"postgresql://alice:s3cret@127.0.0.1:{port}/aigc"
    line = _one_line(cli(*args), 1)
    assert "database" in line and f"postgresql://alice:***@127.0.0.1:{port}/aigc" in line
    assert "s3cret" not in line and "refused" in line.lower() and "AIGC_DATABASE_URL" in line


def test_a_sqlite_file_in_a_missing_folder_is_one_line_with_a_hint(tmp_path):
    cli = Cli(tmp_path)
    cli.env["AIGC_DATABASE_URL"] = f"sqlite:///{tmp_path}/no/such/dir/a.db"
    line = _one_line(cli("models", "list"), 1)
    assert "database" in line and f"{tmp_path}/no/such/dir/a.db" in line and "folder" in line


def test_with_aigc_log_level_debug_the_traceback_is_shown_too(tmp_path):
    cli = Cli(tmp_path)
    cli.env.update(AIGC_DATABASE_URL=f"postgresql://alice:s3cret@127.0.0.1:{_free_port()}/aigc",
                   AIGC_LOG_LEVEL="DEBUG")
    r = cli("status")
    assert r.returncode == 1 and "Traceback" in r.stderr and "OperationalError" in r.stderr
    assert "postgresql://alice:***@" in r.stderr.strip().splitlines()[-1]


def test_metrics_on_a_port_in_use_is_one_line_naming_the_address(tmp_path):
    import socket

    cli = Cli(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        line = _one_line(cli("metrics", "--port", port, "--host", "127.0.0.1", timeout=60), 1)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "--port" in line


def test_broker_failures_are_described_in_one_line_with_the_password_masked():
    import redis
    from kombu.exceptions import OperationalError as KombuOperationalError

    from aigc_core.settings import Settings
    from scheduler.cli.root import describe_failure

    settings = Settings(broker_url="redis://:hunter2@10.0.0.7:6379/0")
    for e in (redis.exceptions.ConnectionError("Error 111 connecting to 10.0.0.7:6379. Connection refused."),
              KombuOperationalError("Error 111 connecting to 10.0.0.7:6379. Connection refused.")):
        line = str(describe_failure(e, settings))
        assert "broker" in line and "redis://:***@10.0.0.7:6379/0" in line and "hunter2" not in line
        assert "AIGC_BROKER_URL" in line and "\n" not in line
    assert describe_failure(ValueError("a bug"), settings) is None
    assert describe_failure(PermissionError(13, "Permission denied", "/etc/x"), settings) is None  # not a bind


def test_submit_wait_exits_3_when_the_job_fails_as_wait_does(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    cli = Cli(tmp_path)
    empty = tmp_path / "not-a-model"  # passes registration's checks, fails to load: no tokenizer
    empty.mkdir()
    (empty / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    save_file({"x": np.zeros(1, np.float32)}, str(empty / "model.safetensors"))
    assert cli("models", "register", "broken", empty.as_uri()).returncode == 0
    items = _write(tmp_path / "i.jsonl", ['{"prompt": "x"}'])
    r = cli("submit", "--items", items, "--model", "broken", "--wait")
    assert r.returncode == 3, (r.stdout, r.stderr[-2000:])
    assert "failed" in r.stdout
    w = cli("wait", r.stdout.split()[0])
    assert w.returncode == 3, (w.stdout, w.stderr[-2000:])


def test_results_into_a_closed_pipe_exits_0_without_a_word(tmp_path):
    cli = Cli(tmp_path)
    r = cli("submit", "--items", _write(tmp_path / "i.jsonl", ['{"prompt": "x"}'] * 50), "--model", "espeak-en",
            "--kind", "audio")
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[0]
    # `aigc results JOB --json | head -0`: the reader is gone before the first line is written.
    p = subprocess.Popen([AIGC, "results", job, "--json"], env=cli.env, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and err == "", err


def test_wait_past_its_timeout_exits_4_in_one_line(tmp_path):
    cli = Cli(tmp_path)
    cli.env["AIGC_BROKER_URL"] = f"redis://127.0.0.1:{_free_port()}/0"  # nobody runs the job
    r = cli("submit", "--items", _write(tmp_path / "i.jsonl", ['{"prompt": "x"}']), "--model", "espeak-en",
            "--kind", "audio")
    assert r.returncode == 0, r.stderr
    line = _one_line(cli("wait", r.stdout.split()[0], "--timeout", "0.5"), 4)
    assert "timeout" in line and "still queued" in line


def test_tables_in_a_pipe_never_cut_ids_or_uris(tmp_path):
    # Not a terminal (captured) and no COLUMNS: rich would fit tables to 80 columns and cut ids with "…".
    cli = Cli(tmp_path / ("a-folder-name-long-enough-to-push-any-uri-past-eighty-columns-" * 2))
    cli.root.mkdir()
    model = cli.root / "models" / "speech-model-directory-with-a-long-name"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert cli("models", "register", "a-rather-long-model-name-for-the-table", model.as_uri(), "--kind",
               "audio", "--backend", "espeak").returncode == 0
    r = cli("submit", "--items", _write(cli.root / "i.jsonl", ['{"text": "Good morning."}']), "--model",
            "espeak-en", "--kind", "audio")
    job = r.stdout.split()[0]
    assert cli("wait", job).returncode == 0
    (cli.root / "s.yaml").write_text("schedules:\n  - {name: a-schedule-with-a-name-long-enough-for-the-table, "
                                     "cron: '0 7 * * *', timezone: America/Argentina/ComodRivadavia, "
                                     "job: {kind: audio, model: espeak-en, items: ['Briefing for {date:%A}']}}\n")
    assert cli("schedules", "sync", "s.yaml").returncode == 0
    fired = cli("schedules", "run-now", "a-schedule-with-a-name-long-enough-for-the-table")
    assert fired.returncode == 0, fired.stderr

    def lines(*args) -> list[str]:
        res = cli(*args)
        assert res.returncode == 0, res.stderr
        assert "…" not in res.stdout, res.stdout
        return res.stdout.splitlines()

    uri = next(x for x in lines("results", job))
    assert f"{cli.root}/data/jobs/{job}/items/" in uri  # the whole URI, on its one line
    status = lines("status")
    assert sum(job in x for x in status) >= 1 and sum(fired.stdout.split()[0] in x for x in status) >= 1
    assert any("a-rather-long-model-name-for-the-table@1" in x and model.as_uri() in x
               for x in lines("models", "list"))
    assert any("a-schedule-with-a-name-long-enough-for-the-table" in x and "America/Argentina/ComodRivadavia" in x
               and fired.stdout.split()[0] in x for x in lines("schedules", "list"))


def test_short_job_ids_as_printed_are_accepted_by_every_command(tmp_path):
    cli = Cli(tmp_path)
    r = cli("submit", "--items", _write(tmp_path / "i.jsonl", ['{"text": "Good morning."}']), "--model", "espeak-en",
            "--kind", "audio")
    job = r.stdout.split()[0]
    for args in (("wait", job[:8]), ("status", job[:8]), ("status", job[:6], "--json"), ("results", job[:7]),
                 ("results", job[:8], "--download", tmp_path / "d"), ("retry", job[:8]), ("cancel", job[:8])):
        res = cli(*args)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    assert json.loads(cli("status", job[:6], "--json").stdout)["id"] == job
    line = _one_line(cli("status", job[:5]), 2)
    assert "at least 6" in line


def test_submit_wait_on_the_embedded_default_warms_up_and_ends_with_everything_written(tmp_path, tiny_text_model):
    cli = Cli(tmp_path)
    _register(cli, tiny_text_model)
    items = _write(tmp_path / "i.jsonl", [json.dumps({"custom_id": f"c{i}", "prompt": f"p {i}"}) for i in range(6)])
    r = subprocess.run([AIGC, "submit", "--items", items, "--model", "tiny", "-p", "max_new_tokens=4", "--wait"],
                       env={**cli.env, "AIGC_LOG_LEVEL": "DEBUG"}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
    # torch and the backend were imported on the warm-up thread while the job was written
    assert "warm: device cpu" in r.stderr
    job = r.stdout.split()[0]
    assert "6 ok" in r.stdout and "manifest:" in r.stdout  # printed in full before the process ended
    # The process ended without torch's teardown (os._exit): what it committed is all there.
    with sqlite3.connect(cli.db_path) as c:
        assert c.execute("SELECT status FROM jobs WHERE id = ?", (job,)).fetchone()[0] == "succeeded"
        assert c.execute("SELECT count(*) FROM artifacts WHERE job_id = ?", (job,)).fetchone()[0] == 6
    manifest = tmp_path / "data" / "jobs" / job / "manifest.jsonl"
    assert len(manifest.read_text().splitlines()) == 6


def test_main_in_process_returns_with_torch_loaded_only_the_console_script_ends_the_process(tmp_path):
    """``main`` is what tests (and embedders) call in-process: it must raise SystemExit, never end the
    interpreter, even with torch imported. Run in a child: an os._exit here would end pytest with rc 0."""
    code = ("import sys, torch\nfrom scheduler.cli.root import main\nsys.argv = ['aigc', '--version']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    print('returned', e.code)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "returned 0" in r.stdout, (r.stdout, r.stderr[-2000:])


def test_os_exit_in_the_pytest_process_raises_instead_of_ending_the_run():
    with pytest.raises(RuntimeError, match=r"os\._exit\(0\) called in the pytest process"):
        os._exit(0)
