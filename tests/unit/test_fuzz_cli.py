"""Bad files, fuzzed: every ``aigc`` command that reads a user's file answers garbage, binary, deeply nested,
self-multiplying (YAML aliases) or wrong-typed content with exit code 2 and one line on stderr, never a
traceback; huge inputs are refused by size or count without reading them into memory."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc_core.errors import SpecError
from aigc_core.settings import Limits
from aigc_core.spec import load_items_jsonl, load_yaml
from tests.unit.test_cli import AIGC, Cli

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class InProcessCli:
    """``aigc`` run in this process through ``scheduler.cli.root`` (its real error handling), against an
    embedded SQLite database of its own: fast enough for hypothesis."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {"AIGC_DATABASE_URL": f"sqlite:///{root}/a.db", "AIGC_STORAGE_URL": f"file://{root}/data",
                    "AIGC_CACHE_DIR": str(root / "cache")}

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        from scheduler.cli import root as cli

        full = {**self.env, **(env or {})}
        saved = {k: v for k, v in os.environ.items() if k.startswith("AIGC_")}
        out, err = io.StringIO(), io.StringIO()
        try:
            for k in saved:
                del os.environ[k]
            os.environ.update(full)
            sys_argv = sys.argv
            sys.argv = ["aigc", *map(str, args)]
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = sys_argv
            for k in full:
                os.environ.pop(k, None)
            os.environ.update(saved)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def aigc(tmp_path_factory) -> InProcessCli:
    return InProcessCli(tmp_path_factory.mktemp("fuzz-cli"))


def assert_one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0][7:].strip(), err
    assert out == "", out
    return lines[0]


def assert_refused_or_accepted(code: int, out: str, err: str) -> None:
    """Garbage is refused with one line; the rare input that happens to be valid is accepted cleanly."""
    if code == 0:
        assert "Traceback" not in err and "error" not in err, err
        return
    assert_one_line_error(code, out, err)


# ---- strategies -----------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
           | st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["[/b]", "[bold]x", ":x:"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=15)
job_like = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["text", "image", "audio", "video"]) | json_values,
    "model": st.sampled_from(["espeak-en", "demo-digits", "nope"]) | json_values,
    "items": st.lists(json_values | st.fixed_dictionaries({"prompt": st.text(max_size=20)}, optional={
        "custom_id": st.text(max_size=8) | st.sampled_from(["[/b]", "a\nb"]), "params": json_values}), max_size=4)
    | json_values,
    "items_file": json_values | st.sampled_from(["missing.jsonl", "", ".", "/dev/null", "../../etc/passwd"]),
    "params": json_values, "seed": json_values, "metadata": json_values, "after": json_values,
    "chunk_size": json_values,
})
yaml_chars = st.text(alphabet=st.sampled_from([*list("[]{}:,-&*!|>'\"#%@`?\n \t\\ab01.~"), "\x00", "\ufeff", "é"]),
                     max_size=80)


def nested(depth: int, style: str) -> str:
    if style == "flow-list":
        return "[" * depth + "]" * depth
    if style == "flow-map":
        return "{a: " * depth + "1" + "}" * depth
    return "".join("  " * i + "- \n" for i in range(depth)) + "  " * depth + "- x\n"


def billion_laughs(levels: int = 12) -> str:
    lines = ['a: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"b{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    top = levels - 1
    return "\n".join(lines) + f"\nkind: text\nmodel: espeak-en\nitems: *a{top}\nmetadata: {{x: *a{top}}}\n"


yaml_documents = st.one_of(
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    yaml_chars,
    json_values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    job_like.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.builds(nested, st.integers(1, 3000), st.sampled_from(["flow-list", "flow-map", "block"])),
    st.integers(2, 14).map(billion_laughs),
    st.sampled_from(["!!python/object/apply:os.system ['echo pwned']", "!!binary aGVsbG8=",
                     "kind: text\nmodel: espeak-en\nitems: [{prompt: x}]\nmetadata: {b: !!binary /w==}\n",
                     "kind: text\nmodel: espeak-en\nitems: [{prompt: x}]\nparams: [1, 2]\n",
                     "kind: text\nitems_file: [a, b]\n", "kind: text\nitems_file: 3\n",
                     "kind: text\nitems: {a: 1}\n", "? [a, b]\n: c\n", "a: 1\na: 2\n", "--- 1\n--- 2\n",
                     "kind: text\nmodel: espeak-en\nitems: [{prompt: x}]\nseed: 2018-01-01\n"]),
)
jsonl_lines = st.one_of(
    json_values.map(lambda v: json.dumps(v)),
    job_like.map(lambda v: json.dumps(v.get("items"))),
    st.fixed_dictionaries({"prompt": st.text(max_size=20)}, optional={
        "custom_id": st.text(max_size=8) | st.sampled_from(["[/b]", "a\nb", ""]),
        "params": st.dictionaries(st.sampled_from(["max_new_tokens", "temperature", "bogus", "height"]),
                                  json_values, max_size=2),
        "text": json_values, "from": json_values}).map(json.dumps),
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 100_000)),
    st.sampled_from(["NaN", '{"prompt": NaN}', '{"prompt": "x", "params": {"temperature": Infinity}}', "\ufeff{}",
                     '{"prompt": "x", "prompt": 3}', "{", "\x00", '{"prompt": "\\ud800"}']),
    yaml_chars,
)
jsonl_files = st.one_of(st.lists(jsonl_lines, min_size=1, max_size=6)
                        .map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
                        st.binary(max_size=300))


# ---- fuzzed files through the command line --------------------------------------------------------

@FUZZ
@given(doc=yaml_documents)
def test_submit_of_any_job_file_exits_2_with_one_line_or_accepts_it(aigc, doc):
    path = aigc.root / "job.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    assert_refused_or_accepted(*aigc("submit", path))


@FUZZ
@given(data=jsonl_files)
def test_submit_of_any_items_file_exits_2_with_one_line_or_accepts_it(aigc, data):
    path = aigc.root / "items.jsonl"
    path.write_bytes(data)
    assert_refused_or_accepted(*aigc("submit", "--items", path, "--kind", "audio", "--model", "espeak-en"))


@FUZZ
@given(doc=yaml_documents, items=jsonl_files)
def test_a_job_file_naming_any_items_file_exits_2_with_one_line_or_accepts_it(aigc, doc, items):
    (aigc.root / "its-items.jsonl").write_bytes(items)
    data = yaml.safe_load(doc) if doc.startswith("kind") else None
    job = {**(data if isinstance(data, dict) else {}), "items_file": "its-items.jsonl"}
    path = aigc.root / "job-with-file.yaml"
    path.write_text(yaml.safe_dump(job), encoding="utf-8")
    assert_refused_or_accepted(*aigc("submit", path, "--kind", "audio", "--model", "espeak-en"))


@FUZZ
@given(doc=yaml_documents | json_values.map(lambda v: yaml.safe_dump({"schedules": [v]})))
def test_schedules_sync_of_any_file_exits_2_with_one_line_or_accepts_it(aigc, doc):
    path = aigc.root / "schedules.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    assert_refused_or_accepted(*aigc("schedules", "sync", path))


@FUZZ
@given(doc=yaml_documents | json_values.map(lambda v: yaml.safe_dump({"models": [v]})))
def test_any_models_file_exits_2_with_one_line_or_is_synced(aigc, doc):
    path = aigc.root / "models.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    assert_refused_or_accepted(*aigc("models", "list", env={"AIGC_MODELS_FILE": str(path)}))


@FUZZ
@given(params=st.lists(st.text(max_size=20) | yaml_chars.map(lambda t: "p=" + t), min_size=1, max_size=3))
def test_any_param_option_exits_2_with_one_line_or_is_accepted(aigc, params):
    path = aigc.root / "one.jsonl"
    path.write_text('{"prompt": "hello"}\n')
    args = [a for p in params for a in ("--param", p)]
    assert_refused_or_accepted(*aigc("submit", "--items", path, "--kind", "audio", "--model", "espeak-en", *args))


def test_an_error_quoting_markup_or_a_newline_from_the_file_stays_one_plain_line(aigc):
    path = aigc.root / "dup.jsonl"
    path.write_text('{"custom_id": "[/b]", "prompt": "x"}\n{"custom_id": "[/b]", "prompt": "y"}\n')
    line = assert_one_line_error(*aigc("submit", "--items", path, "--kind", "audio", "--model", "espeak-en"))
    assert "'[/b]' duplicates items[0]" in line
    path.write_text('{"prompt": "x", "params": {"a\\nb": 1}}\n')
    line = assert_one_line_error(*aigc("submit", "--items", path, "--kind", "audio", "--model", "espeak-en"))
    assert "a\\nb" in line


@pytest.mark.parametrize("doc", [nested(5000, "flow-list"), nested(5000, "flow-map"), nested(2000, "block"),
                                 billion_laughs(20)], ids=["flow-list", "flow-map", "block", "billion-laughs"])
def test_a_deeply_nested_or_self_multiplying_yaml_file_is_refused_quickly(aigc, doc):
    path = aigc.root / "evil.yaml"
    path.write_text(doc)
    started = time.monotonic()
    line = assert_one_line_error(*aigc("submit", path))
    assert time.monotonic() - started < 10
    assert "nested" in line or "expands" in line


# ---- huge inputs ------------------------------------------------------------------------------------

def test_a_1gb_items_file_is_refused_by_its_size_before_it_is_read(tmp_path):
    big = tmp_path / "huge.jsonl"
    with big.open("wb") as f:  # sparse: a gigabyte that costs no disk
        f.truncate(1 << 30)
    started = time.monotonic()
    with pytest.raises(SpecError, match=r"1073741824 bytes is over the limit of 268435456"):
        load_items_jsonl(big)
    assert time.monotonic() - started < 1.0


def test_an_endless_items_stream_is_cut_at_its_first_overlong_line(tmp_path):
    with pytest.raises(SpecError, match=r"line 1: longer than"):
        load_items_jsonl(Path("/dev/zero"))


def test_a_yaml_file_over_its_limit_is_refused_before_it_is_parsed(tmp_path):
    big = tmp_path / "job.yaml"
    with big.open("wb") as f:
        f.truncate(Limits().max_yaml_file_bytes + 1)
    with pytest.raises(SpecError, match=r"larger than the limit of 16777216 bytes"):
        load_yaml(big)


def _million_lines(path: Path, n: int = 1_000_000) -> Path:
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(f'{{"prompt": "headline number {i}"}}\n' for i in range(start, start + 10_000)))
    return path


MEASURE = """
import resource, sys, time
from pathlib import Path
from aigc_core.errors import SpecError
from aigc_core.spec import load_items_jsonl
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
try:
    load_items_jsonl(Path(sys.argv[1]))
    print("accepted")
except SpecError as e:
    print("refused:", e)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, round(time.monotonic() - started, 2))
"""


def test_a_million_item_file_is_refused_at_the_item_limit_with_bounded_memory(tmp_path):
    path = _million_lines(tmp_path / "million.jsonl")
    r = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2],
                       env={**os.environ, "AIGC_LIMIT_MAX_ITEMS_PER_JOB": "100000"})
    assert r.returncode == 0, r.stderr
    verdict, measures = r.stdout.strip().splitlines()
    growth_mb, _seconds = measures.split()
    assert verdict.startswith("refused:") and "more than 100000 items, over the limit of 100000" in verdict, verdict
    # a million parsed items would take hundreds of MB; counting lines takes a read buffer
    assert int(growth_mb) < 32, f"peak RSS grew by {growth_mb} MB"


def test_client_submit_refuses_a_generator_of_a_million_items_without_materialising_it(sqlite_settings):
    from scheduler import Client
    from scheduler.bulk import STREAM_BATCH

    c = Client(sqlite_settings.model_copy(update={"limits": sqlite_settings.limits.model_copy(
        update={"max_items_per_job": 100_000})}))
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(1_000_000):
            pulled += 1
            yield f"headline {i}"

    with pytest.raises(SpecError, match="over the limit of 100000 per job"):
        c.submit("audio", model="espeak-en", items=items())
    assert pulled <= 100_000 + STREAM_BATCH  # read a batch at a time, refused at the batch that crosses it
    with pytest.raises(SpecError, match="100001 items is over the limit of 100000 per job"):
        c.submit({"kind": "audio", "model": "espeak-en", "items": [{"prompt": "x"}] * 100_001})
    assert c.jobs() == []


# ---- the real console script ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["binary-job-file", "billion-laughs", "deep-items-line", "huge-items-file",
                                  "items-file-is-a-directory"])
def test_the_aigc_script_exits_2_with_one_line_for_a_bad_file(tmp_path, case):
    assert AIGC, "the aigc console script is not installed"
    cli = Cli(tmp_path)
    if case == "binary-job-file":
        (tmp_path / "job.yaml").write_bytes(bytes(range(256)) * 4)
        args = ["submit", tmp_path / "job.yaml"]
    elif case == "billion-laughs":
        (tmp_path / "job.yaml").write_text(billion_laughs(20))
        args = ["submit", tmp_path / "job.yaml"]
    elif case == "deep-items-line":
        (tmp_path / "items.jsonl").write_text('{"prompt": "x", "params": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        args = ["submit", "--items", tmp_path / "items.jsonl", "--model", "espeak-en", "--kind", "audio"]
    elif case == "huge-items-file":
        with (tmp_path / "items.jsonl").open("wb") as f:
            f.truncate(1 << 30)
        args = ["submit", "--items", tmp_path / "items.jsonl", "--model", "espeak-en", "--kind", "audio"]
    else:
        args = ["submit", "--items", tmp_path, "--model", "espeak-en", "--kind", "audio"]
    r = cli(*args, timeout=60)
    assert_one_line_error(r.returncode, r.stdout, r.stderr)
    assert cli.job_rows() == 0
