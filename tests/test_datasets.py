"""Readers read back what the shapes world writes; bad images are skipped; task mixture."""

import io
import json
import logging
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from training.datasets import (
    CocoCaptions, CocoDetection, TaskMixture, VqaDataset, WebDatasetShards, expand_shards,
    image_files_from_coco,
)
from training.shapes import write_dataset

N = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_dataset(out, N, seed=0, noise=0.3, n_val=3, n_test=3, n_heldout=3, shard_size=5,
                  progress=False)
    return out


def _scenes(world: Path, split: str) -> list[dict]:
    return json.loads((world / f"scenes_{split}.json").read_text())["scenes"]


def test_coco_captions_reads_every_caption(world):
    ds = CocoCaptions(world / "captions_train.json", world / "images" / "train")
    assert len(ds) == 3 * N
    items = [ds[i] for i in range(len(ds))]
    assert Counter(it["image_id"] for it in items) == {i: 3 for i in range(1, N + 1)}
    assert {it["level"] for it in items} == {"brief", "normal", "detailed"}
    assert {it["noise"] for it in items} <= {"none", "other_image", "wrong_attribute", "generic"}
    item = items[0]
    assert item["image"].mode == "RGB" and item["image"].size == (224, 224)
    assert isinstance(item["caption"], str) and item["caption_id"] == 10
    assert ds.skipped == 0


def test_vqa_reads_every_question(world):
    files = image_files_from_coco(world / "captions_val.json")
    ds = VqaDataset(world / "questions_val.json", world / "annotations_vqa_val.json",
                    world / "images" / "val", image_files=files)
    anns = json.loads((world / "annotations_vqa_val.json").read_text())["annotations"]
    assert len(ds) == len(anns) > 0
    for i, ann in enumerate(anns):
        item = ds[i]
        assert item["question_id"] == ann["question_id"]
        assert item["answer"] == ann["multiple_choice_answer"]
        assert item["answers"] == [ann["multiple_choice_answer"]] * 10
        assert item["image"].size == (224, 224)
    by_function = VqaDataset(world / "questions_val.json", None, world / "images" / "val",
                             image_files=lambda image_id: f"{image_id:012d}.png")
    assert by_function[0]["answer"] is None and by_function[0]["question"] == ds[0]["question"]
    del files[10_000_002]  # questions about an image the mapping does not know are dropped
    partial = VqaDataset(world / "questions_val.json", None, world / "images" / "val", image_files=files)
    assert len(partial) == len(ds) - sum(a["image_id"] == 10_000_002 for a in anns)


def test_vqa_coco_file_name_convention_and_majority_answer(tmp_path):
    Image.new("RGB", (20, 10), "red").save(tmp_path / "COCO_val2014_000000000042.jpg")
    (tmp_path / "q.json").write_text(json.dumps({"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "what colour?", "question_id": 420}]}))
    answers = ["red"] * 6 + ["orange"] * 4
    (tmp_path / "a.json").write_text(json.dumps({"annotations": [{
        "question_id": 420, "image_id": 42, "question_type": "what color", "answer_type": "other",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in
                    enumerate(answers)]}]}))
    item = VqaDataset(tmp_path / "q.json", tmp_path / "a.json", tmp_path)[0]
    assert item["answer"] == "red" and item["answers"] == answers and item["image"].size == (20, 10)


def test_detection_boxes_match_scenes(world):
    ds = CocoDetection(world / "instances_test.json", world / "images" / "test")
    scenes = {s["id"]: s for s in _scenes(world, "test")}
    assert len(ds) == len(scenes) == 3
    for item in ds:
        scene = scenes[item["image_id"]]
        assert item["boxes"].dtype == torch.float32 and item["boxes"].shape == (len(scene["objects"]), 4)
        assert item["boxes"].tolist() == [o["box"] for o in scene["objects"]]
        assert item["labels"] == [f"{o['colour']} {o['shape']}" for o in scene["objects"]]
        assert (item["width"], item["height"]) == item["image"].size == (224, 224)


def test_webdataset_yields_every_sample(world):
    shards = sorted(str(p) for p in (world / "shards").glob("train-*.tar"))
    assert len(shards) == 4  # 16 samples, 5 per shard
    by_glob = list(WebDatasetShards(str(world / "shards" / "train-*.tar")))
    by_braces = WebDatasetShards(str(world / "shards" / "train-{000000..000003}.tar"))
    assert by_braces.shards == shards == expand_shards(shards)
    assert [s["__key__"] for s in by_glob] == [f"{i:012d}" for i in range(1, N + 1)]
    sample = by_glob[0]
    assert set(sample) == {"__key__", "__url__", "png", "json", "image"}
    assert sample["json"]["image_id"] == 1 and len(sample["json"]["captions"]) == 3
    with Image.open(world / "images" / "train" / "000000000001.png") as im:
        assert sample["image"].tobytes() == im.convert("RGB").tobytes()


def test_webdataset_splits_shards_over_ranks_and_workers(world):
    pattern = str(world / "shards" / "train-*.tar")
    ranks = [[s["__key__"] for s in WebDatasetShards(pattern, rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == [f"{i:012d}" for i in range(1, N + 1)]
    loader = DataLoader(WebDatasetShards(pattern), batch_size=None, num_workers=2,
                        collate_fn=lambda s: s["__key__"])
    assert sorted(loader) == [f"{i:012d}" for i in range(1, N + 1)]


@pytest.fixture
def damaged(world, tmp_path) -> Path:
    """A copy of the val split with image 1 truncated and image 2 missing."""
    root = tmp_path / "images"
    shutil.copytree(world / "images" / "val", root)
    bad = root / "000010000001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    (root / "000010000002.png").unlink()
    return root


def test_map_datasets_skip_and_count_unreadable_images(world, damaged, caplog):
    caplog.set_level(logging.WARNING, logger="training.datasets")
    ds = CocoCaptions(world / "captions_val.json", damaged)
    loader = DataLoader(ds, batch_size=4, collate_fn=list)
    items = [it for batch in loader for it in batch]
    assert len(items) == len(ds) == 9  # each bad index is filled by the next readable one
    assert {it["image_id"] for it in items} == {10_000_003}
    assert ds.skipped == 2
    assert sum("unreadable image" in r.message for r in caplog.records) == 2

    det = CocoDetection(world / "instances_val.json", damaged)
    assert [det[i]["image_id"] for i in range(3)] == [10_000_003] * 3 and det.skipped == 2
    vqa = VqaDataset(world / "questions_val.json", world / "annotations_vqa_val.json", damaged,
                     image_files=image_files_from_coco(world / "captions_val.json"))
    assert {vqa[i]["image_id"] for i in range(len(vqa))} == {10_000_003} and vqa.skipped == 2


def test_map_dataset_with_no_readable_image_raises(world, tmp_path):
    ds = CocoCaptions(world / "captions_val.json", tmp_path)
    with pytest.raises(RuntimeError, match="no readable image"):
        ds[0]
    assert ds.skipped == 3


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_skips_bad_samples_and_missing_shards(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 6), "blue").save(png, format="PNG")
    png = png.getvalue()
    _tar(tmp_path / "a.tar", {
        "dir/s1.png": png, "dir/s1.txt": b"one", "dir/s1.cls": b"3",
        "dir/s2.png": png[:30], "dir/s2.txt": b"two",  # truncated image
        "dir/s3.jpg": b"not an image at all",
        "dir/s4.seg.png": png, "dir/s4.json": b'{"k": 1}',
    })
    ds = WebDatasetShards([tmp_path / "a.tar", tmp_path / "missing.tar"])
    samples = list(ds)
    assert [s["__key__"] for s in samples] == ["dir/s1", "dir/s4"]
    assert samples[0]["txt"] == "one" and samples[0]["cls"] == 3 and samples[0]["image"].size == (8, 6)
    assert samples[1]["json"] == {"k": 1} and samples[1]["image"] is samples[1]["seg.png"]
    assert ds.skipped == 3


class _Count(IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))


def test_task_mixture_proportions_and_determinism():
    datasets = {"caption": [f"c{i}" for i in range(7)], "vqa": _Count(5), "detect": ["d0", "d1"]}
    weights = {"caption": 2.0, "vqa": 1.0, "detect": 1.0}
    draws = list(TaskMixture(datasets, weights, seed=0, num_samples=8000))
    counts = Counter(task for task, _ in draws)
    assert abs(counts["caption"] / 8000 - 0.5) < 0.03
    assert abs(counts["vqa"] / 8000 - 0.25) < 0.03 and abs(counts["detect"] / 8000 - 0.25) < 0.03
    # map-style datasets are read in full passes; iterable ones restart in order
    captions = [item for task, item in draws if task == "caption"]
    assert sorted(captions[:7]) == sorted(datasets["caption"])
    assert [item for task, item in draws if task == "vqa"][:7] == [0, 1, 2, 3, 4, 0, 1]

    again = list(TaskMixture(datasets, weights, seed=0, num_samples=8000))
    other = list(TaskMixture(datasets, weights, seed=1, num_samples=8000))
    assert draws == again and draws != other
    epoch1 = TaskMixture(datasets, weights, seed=0, num_samples=100)
    epoch1.set_epoch(1)
    assert list(epoch1) != draws[:100]


def test_task_mixture_in_dataloader_workers_and_bad_arguments():
    mix = TaskMixture({"a": list(range(10)), "b": list(range(10))}, {"a": 1, "b": 0}, num_samples=9)
    assert len(mix) == 9
    out = list(DataLoader(mix, batch_size=None, num_workers=2))
    assert len(out) == 9 and {task for task, _ in out} == {"a"}
    with pytest.raises(ValueError):
        TaskMixture({"a": [1]}, {"b": 1.0})
    with pytest.raises(ValueError):
        TaskMixture({"a": [1]}, {"a": 0.0})
