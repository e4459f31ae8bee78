"""What C2PA signing costs per output (worker/credentials.py), with and without a thumbnail.

A 256x256 PNG (noise: it compresses as badly as a real picture), a 32x32 PNG (the demo digits), a 1 s
and a 10 s WAV (22.05 kHz mono, as espeak writes), each signed with a test CA's ES256 key as the worker
signs it; thumbnail off (the default) and on, in interleaved rounds. Milliseconds per file and bytes
added; verifying one signed file too.

    python -m bench.c2pa_sign [--quick] [--rounds 5] [--n 40]
"""

from __future__ import annotations

import io
import tempfile
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from bench.common import fmt_range, interleave_many, quick_arg, summary, table, write_json

PROV = {"job_id": "bench", "item_index": 0, "custom_id": "0", "seed": 1, "params": {"steps": 1},
        "model": {"name": "bench", "version": "1", "weights_digest": "sha256:00", "backend": "bench"}}


def _png(side: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _wav(seconds: float) -> bytes:
    import soundfile as sf

    rate = 22050
    t = np.arange(int(rate * seconds)) / rate
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _timed(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> dict:
    from aigc_core.credentials import init_test_ca, material_from, verify
    from worker.credentials import sign_bytes

    p = quick_arg()
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--n", type=int, default=None, help="signatures per file, variant and round")
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    n = args.n or (15 if args.quick else 40)
    with tempfile.TemporaryDirectory() as tmp:
        ca = init_test_ca(tmp)
        material = material_from(str(ca["chain"]), None, str(ca["key"]), None)
        anchors = ca["ca"].read_text()
    files = {"PNG 256x256": ("image/png", _png(256)), "PNG 32x32": ("image/png", _png(32)),
             "WAV 1 s": ("audio/wav", _wav(1.0)), "WAV 10 s": ("audio/wav", _wav(10.0))}
    rows, res = [], {}
    for label, (media_type, data) in files.items():
        sign = {thumb: partial(sign_bytes, material, data, media_type, PROV, thumbnail=thumb)
                for thumb in (False, True)}
        for fn in sign.values():
            fn()  # warm-up: the library, the key
        ms = interleave_many(rounds, {"off": partial(_timed, sign[False], n), "on": partial(_timed, sign[True], n)})
        signed = {k: sign[k == "on"]().data for k in ("off", "on")}
        verify_ms = summary([_timed(partial(verify, signed["off"], anchors=anchors), n) for _ in range(rounds)])
        res[label] = {"bytes": len(data), **{f"thumbnail_{k}": {"ms": summary(ms[k]), "added_bytes":
                                                                 len(signed[k]) - len(data)} for k in ("off", "on")},
                      "verify_ms": verify_ms, "state": verify(signed["off"], anchors=anchors)["state"]}
        r = res[label]
        rows.append([label, f"{len(data) / 1024:.1f}", fmt_range(r["thumbnail_off"]["ms"], 2),
                     f"{r['thumbnail_off']['added_bytes'] / 1024:.1f}", fmt_range(r["thumbnail_on"]["ms"], 2),
                     f"{r['thumbnail_on']['added_bytes'] / 1024:.1f}", fmt_range(verify_ms, 2), r["state"]])
    t = table(f"C2PA signing per file (ES256, test CA), {n} per round, {rounds} interleaved rounds, median [range]",
              ["file", "KB", "ms, no thumbnail", "+KB", "ms, thumbnail", "+KB", "verify ms", "state"], rows)
    result = {"rounds": rounds, "n": n, "files": res, "tables": [t], "targets": []}
    write_json("c2pa_sign", result)
    return result


if __name__ == "__main__":
    main()
