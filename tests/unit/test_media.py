"""Provenance embedded in PNG (a tEXt chunk) and WAV (a RIFF LIST/INFO ICMT entry), read back by
ordinary tools: Pillow for PNG, soundfile and the standard library's wave module for WAV."""

from __future__ import annotations

import io
import json
import struct
import wave

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from aigc_models.media import PNG_KEY, embed_metadata, read_png_metadata, read_wav_metadata

META = {"job_id": "8f1c", "index": 3, "seed": 1003, "model": {"name": "demo-digits", "version": 2},
        "prompt": "caf\u00e9 \u2615 at dawn"}


@pytest.fixture
def png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _wav(samples: int = 101, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (np.arange(samples) % 200 - 100).astype(np.int16), 22050, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_png_provenance_reads_back_through_pillow(png):
    tagged = embed_metadata(png, "image/png", META)
    img = Image.open(io.BytesIO(tagged))
    assert json.loads(img.text[PNG_KEY]) == META
    assert read_png_metadata(tagged) == META
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(io.BytesIO(png))))


def test_embedding_is_deterministic(png):
    assert embed_metadata(png, "image/png", META) == embed_metadata(png, "image/png", dict(reversed(META.items())))
    assert embed_metadata(_wav(), "audio/wav", META) == embed_metadata(_wav(), "audio/wav", META)


def test_embedding_twice_replaces_the_earlier_record(png):
    twice = embed_metadata(embed_metadata(png, "image/png", {"old": True}), "image/png", META)
    assert twice == embed_metadata(png, "image/png", META)
    wav_twice = embed_metadata(embed_metadata(_wav(), "audio/wav", {"old": True}), "audio/wav", META)
    assert read_wav_metadata(wav_twice) == META
    assert wav_twice == embed_metadata(_wav(), "audio/wav", META)


def test_png_keeps_its_other_text_chunks():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "tiny")
    buf = io.BytesIO()
    Image.new("L", (2, 2)).save(buf, format="PNG", pnginfo=info)
    text = Image.open(io.BytesIO(embed_metadata(buf.getvalue(), "image/png", META))).text
    assert text["Software"] == "tiny" and json.loads(text[PNG_KEY]) == META


@pytest.mark.parametrize(("samples", "subtype"), [(101, "PCM_16"), (101, "PCM_U8")])  # 101 bytes: a pad byte
def test_wav_provenance_reads_back_and_the_audio_is_untouched(samples, subtype):
    raw = _wav(samples, subtype)
    tagged = embed_metadata(raw, "audio/wav", META)
    assert read_wav_metadata(tagged) == META
    before, rate = sf.read(io.BytesIO(raw), dtype="int16")
    after, rate2 = sf.read(io.BytesIO(tagged), dtype="int16")
    assert rate == rate2 and np.array_equal(before, after)
    with wave.open(io.BytesIO(tagged)) as w:
        assert (w.getnframes(), w.getframerate()) == (samples, 22050)
    assert struct.unpack("<I", tagged[4:8])[0] == len(tagged) - 8  # the RIFF size covers the new chunk


def test_wav_keeps_its_other_info_entries():
    raw = _wav()
    inam = b"INAM" + struct.pack("<I", 6) + b"title\0"
    body = raw[12:] + b"LIST" + struct.pack("<I", 4 + len(inam)) + b"INFO" + inam
    with_title = b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body
    tagged = embed_metadata(with_title, "audio/wav", META)
    assert b"INAM\x06\x00\x00\x00title\x00" in tagged
    assert read_wav_metadata(tagged) == META
    assert tagged.count(b"LIST") == 1


def test_a_wav_without_a_record_reads_as_empty():
    assert read_wav_metadata(_wav()) == {}


def test_other_media_types_pass_through_unchanged(png):
    assert embed_metadata(b"plain text", "text/plain; charset=utf-8", META) == b"plain text"
    assert embed_metadata(png, "image/jpeg", META) == png


def test_bytes_that_are_not_the_named_format_are_refused():
    with pytest.raises(ValueError, match="not a PNG"):
        embed_metadata(b"GIF89a....", "image/png", META)
    with pytest.raises(ValueError, match="not a RIFF WAVE"):
        embed_metadata(b"ID3.......", "audio/wav", META)
