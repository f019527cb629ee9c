"""Training reads WebDataset shards through the same example builders as the JSON formats."""

from dataclasses import replace

import numpy as np
import pytest

from qformer.prompts import DEFAULT_PROMPTS
from tests.tiny import pixel_processor
from training.config import DataSection
from training.data import VisionFeatures, caption_examples, detection_examples, load_image, vqa_examples
from training.datasets import load_rgb
from training.demo.shapes import write_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards") / "data"
    write_dataset(root, n=6, seed=1, noise=0.3, n_val=1, n_test=1, n_heldout=1, size=(32, 32), progress=False)
    return root


def _key(e):
    return (e.image_id, e.prompt, e.target, e.objects, e.size)


@pytest.mark.parametrize("build", [caption_examples, vqa_examples, detection_examples])
def test_shards_give_the_examples_the_json_files_give(root, build):
    plain = DataSection(root=str(root), split="train")
    sharded = replace(plain, shards="shards/{split}-*.tar")
    from_json, from_shards = build(plain, DEFAULT_PROMPTS), build(sharded, DEFAULT_PROMPTS)
    assert from_json and sorted(map(_key, from_shards)) == sorted(map(_key, from_json))
    assert all("::" in e.path for e in from_shards)


def test_a_shard_image_decodes_to_the_file_image_and_a_missing_member_is_skipped(root):
    data = DataSection(root=str(root), split="train", shards="shards/{split}-*.tar")
    examples = caption_examples(data, DEFAULT_PROMPTS)
    files = {e.image_id: e.path for e in caption_examples(replace(data, shards=""), DEFAULT_PROMPTS)}
    e = examples[0]
    assert np.array_equal(np.asarray(load_image(e.path)), np.asarray(load_rgb(files[e.image_id])))
    broken = replace(e, path=e.path.split("::")[0] + "::nothing.png")
    source = VisionFeatures(lambda px: px.flatten(2).transpose(1, 2), pixel_processor)
    feats, kept = source([e, broken])
    assert kept == [e] and feats.shape[0] == 1 and source.skipped == {broken.path}


def test_an_empty_shard_pattern_is_a_clear_error(root):
    with pytest.raises(FileNotFoundError, match="no samples in shards"):
        caption_examples(DataSection(root=str(root), split="train", shards="shards/none-*.tar"), DEFAULT_PROMPTS)

