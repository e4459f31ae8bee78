"""The model registry: names, versions under concurrent registration, keys from listings."""

from __future__ import annotations

from pathlib import Path

import pytest

from aigc_core.errors import SpecError
from aigc_core.registry import check_model_name, register, safe_join, user_defaults


def test_a_registration_that_loses_the_version_race_takes_the_next_number(client, tiny_text_model):
    uri = tiny_text_model.as_uri()
    with client.db.session() as s:
        register(s, "house", "text", uri)
    with client.db.session() as s:
        real = s.scalar
        stale = iter([0])  # the first read of max(version) is stale: another process registered v1 meanwhile

        def scalar(stmt, *a, **kw):
            v = next(stale, None)
            return v if v is not None else real(stmt, *a, **kw)

        s.scalar = scalar
        ref = register(s, "house", "text", uri)
    assert ref.version == 2
    assert [m["version"] for m in client.models() if m["name"] == "house"] == [1, 2]


@pytest.mark.parametrize("name", ["", "a@1", "../etc", "a/b", "x" * 129, "a..b", "-lead", "sp ace"])
def test_model_names_that_would_make_bad_paths_or_keys_are_refused(name):
    with pytest.raises(SpecError):
        check_model_name(name)


def test_good_model_names_pass():
    for name in ("house-news", "demo_digits.v2", "A1"):
        assert check_model_name(name) == name


@pytest.mark.parametrize("key", ["/etc/passwd", "a/../../x", "a//b", "..", "a\\\\b"])
def test_listed_keys_that_leave_the_destination_are_refused(tmp_path, key):
    with pytest.raises(SpecError):
        safe_join(tmp_path, key)


def test_a_plain_listed_key_joins_under_the_destination(tmp_path):
    assert safe_join(tmp_path, "items/000001.txt") == (tmp_path / "items" / "000001.txt").resolve()
    assert isinstance(safe_join(Path(tmp_path), "a"), Path)


@pytest.mark.parametrize("bad", [0, -1, True, "8", 2.5, 5000])
def test_a_bad_micro_batch_size_is_refused_at_registration(client, tiny_text_model, bad):
    with pytest.raises(SpecError, match="micro_batch_size"):
        client.register_model("mb", "text", tiny_text_model.as_uri(), defaults={"micro_batch_size": bad})


def test_a_models_file_micro_batch_size_is_checked_too(client, tiny_text_model, tmp_path):
    from aigc_core.registry import sync_models_file

    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - name: mb\n    kind: text\n    uri: {tiny_text_model.as_uri()}\n"
                 "    defaults: {micro_batch_size: 0}\n")
    with client.db.session() as s, pytest.raises(SpecError, match="micro_batch_size"):
        sync_models_file(s, f)


def test_a_models_file_change_in_defaults_alone_makes_a_new_version(client, tiny_text_model, tmp_path):
    from aigc_core.registry import sync_models_file

    f = tmp_path / "models.yaml"

    def sync(defaults: str):
        f.write_text(f"models:\n  - name: mbs\n    kind: text\n    uri: {tiny_text_model.as_uri()}\n"
                     f"    defaults: {defaults}\n")
        with client.db.session() as s:
            return sync_models_file(s, f)[0]

    first = sync("{micro_batch_size: 8}")
    assert sync("{micro_batch_size: 8}").version == first.version  # unchanged: no new version
    second = sync("{micro_batch_size: 32}")
    assert second.version == first.version + 1 and user_defaults(second.defaults) == {"micro_batch_size": 32}
    assert second.digest == first.digest
    with pytest.raises(SpecError, match="micro_batch_size"):
        sync("{micro_batch_size: 0}")


@pytest.mark.parametrize("damage,message", [
    ("missing", "does not exist"),
    ("pickled", "not in safetensors"),
    ("truncated", "truncated"),
    ("not-a-causal-lm", "not a causal language model"),
])
def test_a_models_file_entry_is_checked_as_a_registration_is(client, tiny_text_model, tmp_path, damage, message):
    """models.yaml goes through the same checks as ``aigc models register``: an entry the workers could
    not run is refused at sync, naming the file and the entry, and nothing is written."""
    import json
    import shutil

    from aigc_core.registry import sync_models_file

    model = tmp_path / "m"
    if damage != "missing":
        shutil.copytree(tiny_text_model, model)
    if damage == "pickled":
        (model / "model.safetensors").rename(model / "pytorch_model.bin")
    elif damage == "truncated":
        w = model / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    elif damage == "not-a-causal-lm":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2ForSequenceClassification"]}))
    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - name: checked\n    kind: text\n    uri: {model.as_uri()}\n")
    with client.db.session() as s, pytest.raises(SpecError, match=message) as caught:
        sync_models_file(s, f)
    assert str(f) in str(caught.value) and "checked" in str(caught.value)
    with pytest.raises(SpecError, match="unknown model 'checked'"):
        client.model("checked")


def test_a_models_file_entry_records_the_checkpoint_facts_and_stays_one_version(client, tiny_text_model, tmp_path):
    from aigc_core.registry import sync_models_file

    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - name: facts\n    kind: text\n    uri: {tiny_text_model.as_uri()}\n"
                 "    defaults: {max_new_tokens: 8}\n")
    with client.db.session() as s:
        first = sync_models_file(s, f)[0]
    with client.db.session() as s:
        again = sync_models_file(s, f)[0]
    assert first.defaults["model_type"] == "gpt2" and first.defaults["context_length"] > 0
    assert first.defaults["max_new_tokens"] == 8 and again.version == first.version


def test_a_models_file_with_one_bad_entry_registers_none_of_it(client, tiny_text_model, tmp_path):
    from aigc_core.registry import sync_models_file

    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  - name: good-first\n    kind: text\n    uri: {tiny_text_model.as_uri()}\n"
                 f"  - name: bad-second\n    kind: text\n    uri: {(tmp_path / 'nowhere').as_uri()}\n")
    with client.db.session() as s, pytest.raises(SpecError, match="bad-second"):
        sync_models_file(s, f)  # caught inside the session, which then commits what was written
    for name in ("good-first", "bad-second"):
        with pytest.raises(SpecError, match="unknown model"):
            client.model(name)


def test_a_models_file_that_names_a_model_twice_is_refused(client, tiny_text_model, tmp_path):
    from aigc_core.registry import sync_models_file

    f = tmp_path / "models.yaml"
    entry = f"  - name: twice\n    kind: text\n    uri: {tiny_text_model.as_uri()}\n"
    f.write_text("models:\n" + entry + entry)
    with client.db.session() as s, pytest.raises(SpecError, match=r"models\[1\]: 'twice' is named twice"):
        sync_models_file(s, f)
