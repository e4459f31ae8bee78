"""Images and audio: the efficiency ratio E (runner items/s / bare loop items/s) for the diffusers and
VITS backends, on the tests' tiny checkpoints (a 16x16 DDIM UNet, a tiny VitsModel), through real
PostgreSQL, Redis, S3 and a solo worker per provenance-sidecar setting (on, and off, the default:
AIGC_PROVENANCE_SIDECARS=false), side by side. The bare loops make the same outputs the backends do,
file bytes included (PNG, 16-bit WAV), on one torch thread: for images a batched pipeline call per
micro-batch, for audio one forward per item under its own seed, as the VITS backend runs it.

    python -m bench.media [--quick] [--pairs 3] [--sidecars on|off|both]
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from bench.common import (
    NO_SIDECARS,
    SIDECARS,
    Stack,
    add_rounds_and_sidecars,
    check_outputs,
    efficiency_ratios,
    headline_prompts,
    interleave_many,
    one_torch_thread,
    quick_arg,
    rounds_and_variants,
    run_job,
    summary,
    table,
    variant_cells,
    variant_heads,
    write_json,
)


class BareImage:
    def __init__(self, path):
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True, local_files_only=True)
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, n: int, *, batch: int, steps: int, chunk: int) -> float:
        import numpy as np
        import torch
        from PIL import Image

        sizes = [min(batch, min(chunk, n - c) - b)
                 for c in range(0, n, chunk) for b in range(0, min(chunk, n - c), batch)]
        t0 = time.perf_counter()
        seed = 0
        with torch.inference_mode():
            for size in sizes:
                gens = [torch.Generator().manual_seed(seed + i) for i in range(size)]
                seed += size
                images = self.pipe(batch_size=size, generator=gens, num_inference_steps=steps, eta=0.0,
                                   output_type="np").images
                pixels = (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
                for px in pixels:
                    buf = io.BytesIO()
                    Image.fromarray(px).save(buf, format="PNG")
        return time.perf_counter() - t0


class BareAudio:
    def __init__(self, path):
        from transformers import AutoModelForTextToWaveform, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModelForTextToWaveform.from_pretrained(
            path, use_safetensors=True, local_files_only=True).eval()

    def run(self, texts: list[str]) -> float:
        import numpy as np
        import soundfile as sf
        import torch

        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, text in enumerate(texts):
                enc = self.tok(text, return_tensors="pt")
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(i)
                    out = self.model(**enc)
                n = int(out.sequence_lengths[0]) if out.sequence_lengths is not None else out.waveform.shape[-1]
                wave = np.clip(out.waveform[0, :n].float().numpy(), -1, 1)
                sf.write(io.BytesIO(), wave, int(self.model.config.sampling_rate), format="WAV", subtype="PCM_16")
        return time.perf_counter() - t0


VARIANTS = {"on": SIDECARS, "off": NO_SIDECARS}  # AIGC_PROVENANCE_SIDECARS: two PUTs per item, or one


def main(argv=None) -> dict:
    from tests.support.models import build_tiny_ddim, build_tiny_vits

    p = quick_arg()
    add_rounds_and_sidecars(p, "interleaved rounds per case")
    args = p.parse_args(argv)
    pairs_n, variants = rounds_and_variants(args)
    chunk, batch = 32, 16
    one_torch_thread()
    cases = [("image", "DDIM 16x16, 10 steps", 10, 192), ("image", "DDIM 16x16, 50 steps", 50, 96),
             ("audio", "VITS tiny", None, 96)]
    if args.quick:
        cases = [cases[0], cases[2]]
    out = []
    with Stack("media", chunk_size=chunk, micro_batch_size=batch) as st:
        client = st.client()
        ddim = build_tiny_ddim(st.tmp / "models" / "ddim")
        vits = build_tiny_vits(st.tmp / "models" / "vits")
        for v in variants:
            client.register_model(f"ddim-{v}", "image", ddim.as_uri(), queue=f"media-{v}")
            client.register_model(f"vits-{v}", "audio", vits.as_uri(), queue=f"media-{v}")
            st.worker(f"media-{v}", env=VARIANTS[v])
        bare_image, bare_audio = BareImage(ddim), BareAudio(vits)
        for kind, label, steps, n in cases:
            bare: Callable[[], float]
            if kind == "image":
                assert steps is not None  # every image case names its steps
                items = [{"prompt": f"picture {i}"} for i in range(n)]
                params, model = {"num_inference_steps": steps}, "ddim"
                bare = partial(bare_image.run, n, batch=batch, steps=steps, chunk=chunk)
            else:
                texts = [h.removeprefix("Headline: ").strip() for h in headline_prompts(n)]
                items = [{"text": t} for t in texts]
                params, model = {}, "vits"
                bare = partial(bare_audio.run, texts)

            for v in variants:  # warm-up: each worker loads and pins the model
                run_job(client, f"{model}-{v}", items[:chunk], params=params, kind=kind)
            bare()

            def runner(v: str, model: str = model, items: list[dict[str, str]] = items,
                       params: dict[str, Any] = params, kind: str = kind, n: int = n) -> float:
                r = run_job(client, f"{model}-{v}", items, params=params, kind=kind)
                check_outputs(client, r["job_id"], n, sidecars=v == "on")
                return r["seconds"]

            fns: dict[str, Callable[[], float]] = {v: partial(runner, v) for v in variants}
            fns["bare"] = bare
            runs = interleave_many(pairs_n, fns)
            res: dict[str, Any] = {"kind": kind, "case": label, "items": n, "seconds": runs,
                                   "bare_items_s": summary([n / b for b in runs["bare"]])}
            res.update(efficiency_ratios(runs, variants, n))
            out.append(res)
    rows = []
    for r in out:
        row = [r["kind"], r["case"], r["items"], f"{1e3 / r['bare_items_s']['median']:.1f}",
               f"{r['bare_items_s']['median']:.1f}"]
        rows.append(row + variant_cells(r, variants))
    heads = ["kind", "model", "items", "bare ms/item", "bare it/s"]
    heads += variant_heads(variants)
    text = table(f"Efficiency E for images and audio (micro-batch {batch}, chunk {chunk}; {pairs_n} interleaved "
                 "rounds, median [range]; sidecars on = AIGC_PROVENANCE_SIDECARS=true, off = the default)",
                 heads, rows)
    result = {"sidecars": variants, "cases": out, "table": text}
    write_json("media", result)
    return result


if __name__ == "__main__":
    main()
