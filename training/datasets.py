"""Image and shard primitives of the one data path (``training.data``): decoding an image fully (so a
truncated file fails here, where the caller skips and counts it), and expanding WebDataset shard
patterns. The formats themselves (COCO captions, VQAv2, COCO instances, WebDataset shards) are read by
``training.data``'s example builders.
"""

from __future__ import annotations

import glob
import io
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a path or bytes fully (so truncation fails here) into an RGB image."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im.load()
        return im.convert("RGB")


IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "ppm", "gif"}
KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's split: key up to the first dot


def expand_shards(pattern_or_list: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a list, a glob (``train-*.tar``) or braces (``train-{000000..000009}.tar``)."""
    if not isinstance(pattern_or_list, (str, Path)):
        return [str(p) for p in pattern_or_list]
    pattern = str(pattern_or_list)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        return [pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():]
                for i in range(int(lo), int(hi) + 1)]
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern]
