"""The frozen-feature cache (fp16 on disk) against encoding the same images on the fly."""

import pytest
import torch

from tests.tiny import tiny_bridge
from training.demo import shapes
from training.data import Example, VisionFeatures, build_feature_cache

# fp16 keeps 11 significant bits: a relative error of at most 2**-11 per element (bf16's 8 bits fail this),
# plus fp16's subnormal spacing near zero.
RTOL, ATOL = 2**-10, 1e-6


def _encoder():
    """Features of order one from the pixels (a fixed random projection of 4x4 patches): the tiny random
    towers' outputs are too small (~1e-9) for a precision check."""
    torch.manual_seed(0)
    w = torch.randn(3 * 16, 24)

    def encode(pixels):
        patches = torch.nn.functional.unfold(pixels, 4, stride=4).transpose(1, 2)  # (B, N, 48)
        return patches @ w
    return encode


@pytest.fixture
def examples(tmp_path):
    """Six rendered scenes as caption examples, image ids 0..5."""
    root = tmp_path / "data"
    shapes.write_dataset(root, 6, seed=3, n_val=0, n_test=0, n_heldout=0, size=(32, 32), progress=False)
    paths = sorted((root / "images" / "train").glob("*.png"))
    return [Example(i, str(p), "", "caption") for i, p in enumerate(paths)]


def test_cached_features_match_on_the_fly_encoding_at_fp16_precision(tmp_path, examples):
    _, _, proc = tiny_bridge()
    encode = _encoder()
    cache = build_feature_cache(examples, encode, proc, tmp_path / "cache", batch_size=4,
                                fingerprint="x")
    with torch.no_grad():
        live, kept = VisionFeatures(encode, proc)(examples)
    cached, kept_cached = VisionFeatures(encode, proc, cache)(examples)
    assert [e.image_id for e in kept] == [e.image_id for e in kept_cached] == list(range(len(examples)))
    assert cached.dtype == live.dtype == torch.float32 and cached.shape == live.shape
    assert live.abs().mean() > 0.5
    torch.testing.assert_close(cached, live, rtol=RTOL, atol=ATOL)
    assert not torch.equal(cached, live)  # it is stored in fp16: close, not bit-equal

    # a second build with the same fingerprint reads the file back, unchanged
    again = build_feature_cache(examples, lambda _: 1 / 0, proc, tmp_path / "cache", fingerprint="x")
    assert set(again) == set(cache) and all(torch.equal(again[k], cache[k]) for k in cache)


def test_the_cache_depends_on_the_tower_and_split_not_on_the_task_mix(tmp_path):
    """Stage 1 (captions) and stage 2 (captions, VQA, detection) of one split share one cache, and so do runs on
    subsets of its images; another split does not."""
    from dataclasses import replace

    from training.config import TrainConfig
    from training.data import cache_fingerprint

    cfg = TrainConfig()
    assert cache_fingerprint(cfg) == cache_fingerprint(TrainConfig())
    assert cache_fingerprint(cfg) != cache_fingerprint(replace(cfg, data=replace(cfg.data, split="val")))


def test_a_cache_adds_the_images_it_lacks_and_serves_subsets(tmp_path, examples):
    _, _, proc = tiny_bridge()
    encode, seen = _encoder(), []

    def counting(pixels):
        seen.append(pixels.shape[0])
        return encode(pixels)

    first = build_feature_cache(examples[:4], counting, proc, tmp_path / "cache", fingerprint="x")
    assert set(first) == {0, 1, 2, 3} and sum(seen) == 4
    more = build_feature_cache(examples, counting, proc, tmp_path / "cache", fingerprint="x")
    assert set(more) == set(range(6)) and sum(seen) == 6  # only the two new images were encoded
    assert all(torch.equal(more[k], first[k]) for k in first)
    subset = build_feature_cache(examples[:2], lambda _: 1 / 0, proc, tmp_path / "cache", fingerprint="x")
    assert set(subset) >= {0, 1}  # a subset is served from the cache, nothing encoded
    other = build_feature_cache(examples[:1], counting, proc, tmp_path / "cache", fingerprint="y")
    assert set(other) == {0} and sum(seen) == 7  # another tower or split: a new cache


def test_a_hard_linked_copy_of_a_cache_leaves_its_original_alone(tmp_path, examples):
    """`cp -al` of a build directory shares the cache's files: a rebuild in the copy (here another fingerprint, as
    another data root gives) replaces them there and changes nothing in the original."""
    import os

    _, _, proc = tiny_bridge()
    build_feature_cache(examples[:2], _encoder(), proc, tmp_path / "cache", fingerprint="x")
    (tmp_path / "copy").mkdir()
    for f in ("meta.json", "features.safetensors"):
        os.link(tmp_path / "cache" / f, tmp_path / "copy" / f)
    before = {f: (tmp_path / "cache" / f).read_bytes() for f in ("meta.json", "features.safetensors")}
    build_feature_cache(examples, _encoder(), proc, tmp_path / "copy", fingerprint="y")
    assert {f: (tmp_path / "cache" / f).read_bytes() for f in before} == before
    assert build_feature_cache(examples[:2], lambda _: 1 / 0, proc, tmp_path / "cache", fingerprint="x")
