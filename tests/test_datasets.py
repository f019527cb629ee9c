"""The image and shard primitives of the data path (training.datasets); the formats are read by
training.data (tests/test_data_shards.py, tests/test_training.py)."""

import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from qformer.prompts import DEFAULT_PROMPTS
from tests.tiny import pixel_processor
from training.config import DataSection
from training.data import VisionFeatures, caption_examples
from training.datasets import IMAGE_ERRORS, expand_shards, load_rgb


def _png(size=(8, 6), colour="blue") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_load_rgb_decodes_fully_and_refuses_truncated_images(tmp_path):
    png = _png()
    assert load_rgb(png).size == (8, 6) and load_rgb(png).mode == "RGB"
    (tmp_path / "a.png").write_bytes(png)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "a.png")), np.asarray(load_rgb(png)))
    for bad in (png[:30], b"not an image"):
        with pytest.raises(IMAGE_ERRORS):
            load_rgb(bad)


def test_expand_shards_reads_lists_globs_and_braces(tmp_path):
    for i in range(3):
        (tmp_path / f"train-{i:06d}.tar").write_bytes(b"")
    assert expand_shards(str(tmp_path / "train-*.tar")) == [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    assert expand_shards("s-{000008..000010}.tar") == ["s-000008.tar", "s-000009.tar", "s-000010.tar"]
    assert expand_shards([tmp_path / "x.tar"]) == [str(tmp_path / "x.tar")]


def test_shards_with_bad_images_missing_shards_and_txt_captions(tmp_path, caplog):
    png = _png()
    _tar(tmp_path / "a-000000.tar", {
        "dir/1.png": png, "dir/1.txt": b"a blue thing",
        "dir/2.png": png[:30], "dir/2.txt": b"truncated",
        "dir/3.txt": b"no image: not a sample",
    })
    (tmp_path / "a-000001.tar").write_bytes(b"this is not a tar file")
    data = DataSection(root=str(tmp_path), split="a", shards="{split}-*.tar")
    with caplog.at_level(logging.WARNING):
        examples = caption_examples(data, DEFAULT_PROMPTS)
    assert [(e.image_id, e.target) for e in examples] == [(1, "a blue thing"), (2, "truncated")]
    assert "a-000001.tar" in caplog.text
    source = VisionFeatures(lambda px: px.flatten(2).transpose(1, 2), pixel_processor)
    feats, kept = source(examples)
    assert [e.image_id for e in kept] == [1] and feats.shape[0] == 1 and len(source.skipped) == 1

