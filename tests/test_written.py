"""Reading a bridge's queries back as tokens: a bridge that writes the true description scores 1, one that
writes every number two bins off scores 0 on numbers and 1 elsewhere, with each wrong number 2 off."""

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from tests.tiny import pixel_processor
from training.demo import shapes
from training.demo.pretrain import scene_description
from training.demo.written import by_object, compare, token_kind, written_context

DEMO_TOKENIZER = "qformer/demo/bundle/tokenizer"


def test_token_kinds_and_comparison():
    assert [token_kind(t) for t in ("Ġtop", "Ġcenter", "Ġlarge", "Ġred", ".", "Ġ42")] == [
        "row", "column", "size", "word", "word", "number"]
    total, wrong, off = compare(["Ġtop", "Ġleft", "Ġ40", "Ġred", "Ġ7"], ["Ġtop", "Ġright", "Ġ42", "Ġred", "Ġ1"])
    assert total == {"row": 1, "column": 1, "number": 2, "word": 1}
    assert wrong == {"column": 1, "number": 2}
    assert off == {2: 1, 5: 1}  # 6 bins off counts as 5+


def test_errors_are_counted_by_the_object_they_describe():
    true = ["Ġgrey", "Ġbackground", ".", "Ġtop", "Ġred", ".", "Ġbottom", "Ġblue", "."]
    written = ["Ġgrey", "Ġbackground", ".", "Ġtop", "Ġred", ".", "Ġtop", "Ġred", "."]
    total, wrong = by_object(written, true)
    assert total == {0: 3, 1: 3, 2: 3} and wrong == {0: 0, 1: 0, 2: 2}


class _WritingBridge:
    """Writes, for the i-th image it is shown, the input rows of ``rows[i]`` (one per slot)."""

    def __init__(self, table: torch.Tensor, rows: list[list[int]]):
        self.table, self.rows = table, list(rows)

    def eval(self):
        return self

    def base_input_embeddings(self):
        return self.table

    def encode_images(self, pixels):
        return pixels

    def project_queries(self, feats):
        batch = [self.rows.pop(0) for _ in range(feats.shape[0])]
        width = max(map(len, batch))
        return torch.stack([self.table[r + [0] * (width - len(r))] for r in batch])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("written") / "data"
    shapes.write_dataset(root, 4, seed=0, n_val=0, n_test=5, n_heldout=0, size=(64, 64), progress=False)
    scenes = sorted(json.loads((root / "scenes_test.json").read_text())["scenes"], key=lambda s: s["id"])
    return root, [shapes.Scene.from_dict(s) for s in scenes]


def _bundle(tokenizer, rows):
    table = torch.randn(len(tokenizer), 16, generator=torch.Generator().manual_seed(0))
    return SimpleNamespace(bridge=_WritingBridge(table, rows), tokenizer=tokenizer, image_processor=pixel_processor)


def test_a_bridge_writing_the_true_description_reads_back_exactly(world):
    root, scenes = world
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)
    rows = [tok(scene_description(s), add_special_tokens=False)["input_ids"] for s in scenes]
    out = written_context(_bundle(tok, rows), root, "test", batch_size=2, progress=False)
    assert out["n_scenes"] == 5 and out["tokens"] == sum(map(len, rows))
    assert out["accuracy"] == 1.0 and out["exact_scenes"] == 1.0
    assert all(out[f"{k}_accuracy"] == 1.0 for k in ("row", "column", "size", "word", "number"))
    assert out["object_0_accuracy"] == out["object_1_accuracy"] == 1.0
    assert out["example"]["true"] == out["example"]["written"] == scene_description(scenes[0])


def test_numbers_two_bins_off_are_wrong_numbers_two_off(world):
    root, scenes = world
    tok = AutoTokenizer.from_pretrained(DEMO_TOKENIZER)

    def shifted(scene):
        words = [str((int(w) + 2) % 64) if w.isdigit() and int(w) < 62 else (str(int(w) - 2) if w.isdigit() else w)
                 for w in scene_description(scene).replace(".", " .").split()]
        return tok(" ".join(words).replace(" .", "."), add_special_tokens=False)["input_ids"]

    rows = [shifted(s) for s in scenes]
    out = written_context(_bundle(tok, rows), root, "test", batch_size=3, progress=False)
    assert out["number_accuracy"] == 0.0 and out["number_off_2"] == 1.0
    assert all(out[f"{k}_accuracy"] == 1.0 for k in ("row", "column", "size", "word"))
    assert out["exact_scenes"] == 0.0
