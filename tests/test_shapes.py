"""The shapes world: determinism, formats, splits, noise, grammar round trip, CLI."""

import hashlib
import json
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from training.demo import shapes
from training.demo.shapes import (
    ALL_PAIRS, CATEGORIES, HELDOUT_PAIRS, LEVELS, Obj, Scene, caption,
    caption_precision_recall, make_scene, parse_caption, questions, render, training_captions,
    write_dataset,
)

HELDOUT_LABELS = {f"{c} {s}" for c, s in HELDOUT_PAIRS}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_dataset(out, 30, seed=7, noise=0.5, n_val=6, n_test=6, n_heldout=8, shard_size=7,
                  progress=False)
    return out


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    kwargs = dict(n_val=2, n_test=2, n_heldout=2, noise=0.4, shard_size=4, progress=False)
    write_dataset(tmp_path / "a", 8, seed=3, **kwargs)
    write_dataset(tmp_path / "b", 8, seed=3, **kwargs)
    write_dataset(tmp_path / "c", 8, seed=4, **kwargs)
    a, b, c = (_hashes(tmp_path / d) for d in "abc")
    assert a == b
    assert "shards/train-000001.tar" in a and "images/heldout/000030000002.png" in a
    assert set(a) == set(c)
    differing = {k for k in a if a[k] != c[k]}
    assert {"captions_train.json", "instances_test.json", "shards/train-000000.tar"} <= differing


def test_scene_does_not_depend_on_n(tmp_path):
    write_dataset(tmp_path / "small", 3, seed=5, progress=False)
    write_dataset(tmp_path / "big", 12, seed=5, progress=False)
    for i in range(1, 4):
        name = f"images/train/{i:012d}.png"
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "big" / name).read_bytes()


def test_coco_files_load_with_pycocotools_and_boxes_are_inside(world):
    from pycocotools.coco import COCO

    for split, n in (("train", 30), ("val", 6), ("test", 6), ("heldout", 8)):
        caps = COCO(str(world / f"captions_{split}.json"))
        assert len(caps.getImgIds()) == n and len(caps.getAnnIds()) == 3 * n
        inst = COCO(str(world / f"instances_{split}.json"))
        assert [inst.cats[i] for i in sorted(inst.cats)] == list(CATEGORIES)
        scenes = json.loads((world / f"scenes_{split}.json").read_text())["scenes"]
        assert len(inst.getAnnIds()) == sum(len(s["objects"]) for s in scenes)
        for ann in inst.loadAnns(inst.getAnnIds()):
            img = inst.imgs[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= img["width"] and y + h <= img["height"]
            assert inst.cats[ann["category_id"]]["name"] in {f"{c} {s}" for c, s in ALL_PAIRS}
        for img in caps.imgs.values():
            with Image.open(world / "images" / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"


def test_categories_are_stable_across_seeds(tmp_path):
    write_dataset(tmp_path, 2, seed=99, progress=False)
    cats = json.loads((tmp_path / "instances_val.json").read_text())["categories"]
    assert cats == list(CATEGORIES)
    assert len({c["name"] for c in cats}) == len(cats) == len(ALL_PAIRS)


def test_vqa_files(world):
    qs = json.loads((world / "questions_val.json").read_text())["questions"]
    anns = json.loads((world / "annotations_vqa_val.json").read_text())["annotations"]
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
    assert len({q["question_id"] for q in qs}) == len(qs) > 0
    for q, a in zip(qs, anns):
        assert q["image_id"] == a["image_id"] and q["question"].endswith("?")
        assert len(a["answers"]) == 10
        assert {x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]}
        assert len(a["multiple_choice_answer"].split()) == 1
        assert a["answer_type"] in ("yes/no", "number", "other")


def test_heldout_pairs_only_in_heldout_split():
    for split in ("train", "val", "test"):
        for i in range(300):
            scene = make_scene(0, split, i)
            assert not {o.label for o in scene.objects} & HELDOUT_LABELS
            rng = random.Random(i)
            texts = [c["caption"] for c in training_captions(scene, rng, noise=1.0)]
            texts += [q["question"] for q in questions(scene, rng, k=20)]
            assert not any(label in t for t in texts for label in HELDOUT_LABELS), texts
    seen = Counter()
    for i in range(300):
        labels = {o.label for o in make_scene(0, "heldout", i).objects}
        assert labels & HELDOUT_LABELS
        seen.update(labels & HELDOUT_LABELS)
    assert set(seen) == HELDOUT_LABELS


def test_heldout_pairs_in_written_files(world):
    for split in ("train", "val", "test", "heldout"):
        text = " ".join(json.dumps(json.loads((world / f"{kind}_{split}.json").read_text()))
                        for kind in ("captions", "questions"))
        scenes = json.loads((world / f"scenes_{split}.json").read_text())["scenes"]
        has_heldout = [any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in s["objects"])
                       for s in scenes]
        if split == "heldout":
            assert all(has_heldout)
        else:
            assert not any(has_heldout)
            assert not any(label in text for label in HELDOUT_LABELS)


def test_noise_fraction_and_kinds():
    kinds = Counter()
    for i in range(1000):
        scene = make_scene(1, "train", i)
        for c in training_captions(scene, random.Random(i), noise=0.3):
            kinds[c["noise"]] += 1
            if c["noise"] == "none":
                assert c["caption"] == caption(scene, c["level"])
            else:
                assert c["caption"] != caption(scene, c["level"])
    noisy = 1 - kinds["none"] / sum(kinds.values())
    assert 0.27 < noisy < 0.33
    assert min(kinds[k] for k in shapes.NOISE_KINDS) > 200


def test_eval_splits_are_clean_and_train_is_noisy(world):
    for split in ("val", "test", "heldout"):
        anns = json.loads((world / f"captions_{split}.json").read_text())["annotations"]
        assert {a["noise"] for a in anns} == {"none"}
        assert Counter(a["level"] for a in anns) == {lvl: len(anns) // 3 for lvl in LEVELS}
    anns = json.loads((world / "captions_train.json").read_text())["annotations"]
    assert 0.3 < sum(a["noise"] != "none" for a in anns) / len(anns) < 0.7


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), index=st.integers(0, 10_000),
       split=st.sampled_from(shapes.SPLITS), size=st.sampled_from([(224, 224), (256, 192), (96, 160)]),
       max_objects=st.integers(1, 8))
def test_clean_captions_round_trip_and_corrupted_ones_do_not(seed, index, split, size, max_objects):
    scene = make_scene(seed, split, index, width=size[0], height=size[1], max_objects=max_objects)
    assert 1 <= len(scene.objects) <= max_objects
    wrong = shapes._corrupt(scene, random.Random(index), ALL_PAIRS)
    for level in LEVELS:
        text = caption(scene, level)
        assert len(parse_caption(text)) == len(scene.objects), text
        assert caption_precision_recall(text, scene) == (1.0, 1.0), text
        precision, _ = caption_precision_recall(caption(wrong, level), scene)
        assert precision < 1.0


def _scene(*objs, w=224, h=224):
    return Scene(1, w, h, "grey", tuple(Obj(*o) for o in objs))


def test_parse_and_score_by_hand():
    scene = _scene(("circle", "red", "large", (10, 10, 70, 70)),
                   ("square", "blue", "small", (150, 150, 180, 180)))
    assert caption(scene, "brief") == "a red circle and a blue square"
    assert caption(scene, "normal") == "there are two shapes: a large red circle and a small blue square."
    assert caption(scene, "detailed") == ("there are two shapes on a grey background. a large red circle "
                                          "is in the top left. a small blue square is in the bottom right.")
    assert parse_caption("Two red circles, an orange star.") == [
        shapes.Mention("red", "circle")] * 2 + [shapes.Mention("orange", "star")]
    assert parse_caption("a small red shape at the top") == [shapes.Mention("red", None, "small", "top")]
    assert caption_precision_recall("a red circle", scene) == (1.0, 0.5)
    assert caption_precision_recall("two red circles and a blue square", scene) == (2 / 3, 1.0)
    assert caption_precision_recall("a small red circle", scene) == (0.0, 0.0)  # wrong size
    assert caption_precision_recall("a red circle is on the right", scene) == (0.0, 0.0)
    assert caption_precision_recall("a red circle is on the left", scene) == (1.0, 0.5)
    assert caption_precision_recall("a nice picture of three shapes", scene) == (0.0, 0.0)


def _answer(scene: Scene, question: str) -> str:
    """An independent oracle: answer by brute force over the scene, asserting uniqueness."""
    objs = scene.objects
    words = question.rstrip("?").split()
    plural = {v: k for k, v in shapes.PLURALS.items()}
    if question == "how many shapes are there?":
        return str(len(objs))
    if words[:2] == ["how", "many"]:
        if words[3] == "shapes":
            return str(sum(o.colour == words[2] for o in objs))
        return str(sum(o.shape == plural[words[2]] for o in objs))
    if words[:3] == ["is", "there", words[2]]:
        return "yes" if any(o.label == " ".join(words[3:]) for o in objs) else "no"
    if words[:3] == ["what", "colour", "is"]:
        (match,) = [o for o in objs if o.shape == words[4]]
        return match.colour
    if words[:3] == ["what", "shape", "is"]:
        (match,) = [o for o in objs if o.colour == words[4]]
        return match.shape
    (match,) = [o for o in objs if o.label == " ".join(words[-2:])]
    if words[0] == "where":
        return {("top", "center"): "top", ("bottom", "center"): "bottom", ("middle", "left"): "left",
                ("middle", "right"): "right", ("middle", "center"): "center"}[scene.cell(match)]
    return match.size


def test_questions_have_unique_correct_one_word_answers():
    types = Counter()
    for i in range(400):
        scene = make_scene(2, "test", i)
        qs = questions(scene, random.Random(i), k=6)
        assert len({q["question"] for q in qs}) == len(qs) >= 4
        for q in qs:
            assert _answer(scene, q["question"]) == q["answer"], q
            types[q["question_type"]] += 1
    assert set(types) == {"count", "colour", "shape", "size", "existence", "position"}
    assert min(types.values()) > 100


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("box", [(5, 9, 25, 26), (40, 30, 111, 120), (100, 60, 104, 64)])
def test_rendered_shape_fills_its_box_exactly(shape, box):
    image = render(_scene((shape, "red", "small", box), w=160, h=128))
    assert image.size == (160, 128)
    background = Image.new("RGB", image.size, (128, 128, 128))
    from PIL import ImageChops
    assert ImageChops.difference(image, background).getbbox() == box


def test_render_on_a_plain_fill_draws_the_same_shapes():
    scene = _scene(("circle", "red", "large", (10, 10, 60, 60)), ("square", "white", "small", (80, 80, 100, 100)),
                   w=128, h=128)
    on_white = render(scene, (255, 255, 255))
    assert on_white.getpixel((2, 2)) == (255, 255, 255) and on_white.getpixel((35, 35)) == shapes.COLOURS["red"]
    from PIL import ImageChops
    world = render(scene)  # the shapes' pixels are the world's, only the background differs
    assert ImageChops.difference(world, on_white).crop((20, 20, 50, 50)).getbbox() is None


def test_random_fill_leaves_every_object_visible():
    rng = random.Random(0)
    fills = []
    for i in range(200):
        scene = make_scene(3, "train", i)
        fill = shapes.random_fill(scene, rng)
        assert shapes.visible_on(scene, fill)
        fills.append(fill)
    greys = [f for f in fills if f[0] == f[1] == f[2]]
    assert 0.3 < len(greys) / len(fills) < 0.7  # half greys of any lightness, half any colour
    assert min(f[0] for f in greys) < 60 and max(f[0] for f in greys) > 200
    white_circle = _scene(("circle", "white", "large", (10, 10, 60, 60)), w=128, h=128)
    assert not shapes.visible_on(white_circle, (255, 255, 255)) and shapes.visible_on(white_circle, (0, 0, 0))


def test_cli_writes_dataset_and_has_help(tmp_path, capsys):
    out = tmp_path / "cli"
    assert shapes.main(["shapes", "--out", str(out), "--n", "20", "--seed", "1", "--size", "256x192",
                        "--quiet"]) == 0
    assert json.loads((out / "world.json").read_text())["splits"] == {
        "train": 20, "val": 2, "test": 2, "heldout": 2}
    with Image.open(out / "images" / "train" / "000000000001.png") as im:
        assert im.size == (256, 192)
    with pytest.raises(SystemExit):  # refuses to mix with an earlier run
        shapes.main(["shapes", "--out", str(out), "--n", "3", "--quiet"])
    assert shapes.main(["shapes", "--out", str(out), "--n", "3", "--quiet", "--overwrite"]) == 0
    assert len(list((out / "images" / "train").iterdir())) == 3
    with pytest.raises(SystemExit) as e:
        shapes.main(["shapes", "--help"])
    assert e.value.code == 0
    assert "--noise" in capsys.readouterr().out


@pytest.mark.slow
def test_thousand_scenes_are_fast(tmp_path):
    start = time.perf_counter()
    write_dataset(tmp_path, 1000, seed=0, noise=0.3, n_val=0, n_test=0, n_heldout=0, progress=False)
    assert time.perf_counter() - start < 30
