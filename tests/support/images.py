"""Small captioned image folders for image fine-tuning tests (the layout datasets' imagefolder reads)."""

from __future__ import annotations

import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def write_image_folder(root: Path, n: int, *, size: int = 32, metadata: bool = True) -> Path:
    """``n`` PNGs of a coloured square on a pale ground, captioned "<colour> square" in metadata.jsonl."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        name = list(COLOURS)[i % len(COLOURS)]
        a = np.full((size, size, 3), 235, np.uint8)
        lo, hi = size // 4 + i % 3, 3 * size // 4 + i % 3
        a[lo:hi, lo:hi] = COLOURS[name]
        Image.fromarray(a).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"{name} square"}))
    if metadata:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root
