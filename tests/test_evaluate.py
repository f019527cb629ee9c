"""Evaluation: each metric on hand-made inputs, then a tiny random bundle end to end on the shapes world."""

import json
import re

import pytest
import torch

import training.evaluate as ev
from qformer.boxes import BoxCodec
from qformer.bundle import Bundle, load_bundle, save_bundle
from qformer.generation import Generated
from qformer.prompts import TaskPrompts
from tests.tiny import tiny_bridge
from training.demo import shapes
from training.datasets import load_rgb
from training.evaluate import (
    caption_scores,
    caption_tokens,
    detection_map,
    encode_split_images,
    evaluate_bundle,
    evaluate_captions,
    evaluate_detection,
    evaluate_vqa,
    load_split,
    main,
    normalize_answer,
    report_markdown,
    retrieval_figures,
    retrieval_recall,
    scene_caption_scores,
    vqa_accuracy,
    vqa_scores,
)

# ----------------------------------------------------------------------------- captions

REFS = {
    1: ["a large red circle on a grey background", "a red circle"],
    2: ["two small blue squares and an orange star", "three shapes: two blue squares and a star"],
    3: ["a green hexagon is in the top left", "a green hexagon at the top"],
}


def test_caption_tokens_lowercase_and_drop_punctuation():
    assert caption_tokens("There are TWO shapes: a red circle, and a star.") == "there are two shapes a red circle and a star"


def test_perfect_captions_score_high_and_wrong_ones_low():
    perfect = caption_scores({k: v[0] for k, v in REFS.items()}, REFS)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] > 2.0
    # punctuation and case do not matter
    shouted = caption_scores({k: v[0].upper() + "." for k, v in REFS.items()}, REFS)
    assert shouted == pytest.approx(perfect)
    wrong = caption_scores({1: "a purple cross", 2: "nothing here", 3: "a yellow diamond"}, REFS)
    assert wrong["bleu4"] < 0.1 and wrong["cider"] < 0.5
    assert caption_scores({}, REFS) == {"bleu4": 0.0, "cider": 0.0}
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({9: "a red circle"}, REFS)


def test_scene_grounded_precision_recall_of_the_reference_caption():
    scene = shapes.make_scene(0, "test", 0, width=64, height=64)
    other = shapes.make_scene(0, "test", 1, width=64, height=64)
    exact = scene_caption_scores({1: shapes.caption(scene, "normal")}, {1: scene})
    assert exact == {"precision": 1.0, "recall": 1.0}
    # the dict form works too, and a caption of nothing scores 0
    assert scene_caption_scores({1: "a nice picture"}, {1: scene.to_dict()}) == {"precision": 0.0, "recall": 0.0}
    mixed = scene_caption_scores({1: shapes.caption(scene, "normal"), 2: "a nice picture"}, {1: scene, 2: other})
    assert mixed == {"precision": 0.5, "recall": 0.5}


# ----------------------------------------------------------------------------- VQA


def _ann(qid, answers):
    return {"question_id": qid, "question_type": "count",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}


@pytest.mark.parametrize("text, expected", [
    ("Two.", "2"), ("a dog", "dog"), ("The Dog!", "dog"), ("none", "0"), ("dont", "don't"),
    ("1.5", "1.5"), ("yes\n", "yes"), ("red, blue", "red blue"), ("1,000", "1000"), ("black/white", "black white"),
])
def test_answer_normalisation(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("humans, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_formula_over_leave_one_out_subsets(humans, expected):
    answers = ["2"] * humans + ["3"] * (10 - humans)
    assert vqa_accuracy({7: "Two."}, [_ann(7, answers)]) == pytest.approx(expected)


def test_vqa_accuracy_averages_questions_and_punctuates_disagreeing_answers():
    anns = [_ann(1, ["yes"] * 10), _ann(2, ["no"] * 10), _ann(3, ["red, blue"] * 5 + ["blue"] * 5)]
    assert vqa_scores({1: "Yes", 2: "yes", 3: "Red, blue."}, anns) == {1: 1.0, 2: 0.0, 3: 1.0}
    assert vqa_accuracy({1: "Yes", 2: "yes"}, anns) == 0.5
    assert vqa_accuracy({}, anns) == 0.0
    with pytest.raises(ValueError, match="question id 99"):
        vqa_accuracy({99: "yes"}, anns)


# ----------------------------------------------------------------------------- detection

GT = {
    "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 100, "height": 80}],
    "categories": [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 40, 25, 25], "area": 625, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
    ],
}


def _perfect(shift=0.0):
    return [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": [a["bbox"][0] + shift, a["bbox"][1] + shift, a["bbox"][2], a["bbox"][3]], "score": 0.9 - 0.1 * i}
            for i, a in enumerate(GT["annotations"])]


def test_detection_map_perfect_shifted_and_empty(tmp_path, capsys):
    assert detection_map(_perfect(), GT) == {"map50": pytest.approx(1.0), "map50_95": pytest.approx(1.0)}
    shifted = detection_map(_perfect(shift=4.0), GT)
    assert shifted["map50"] == pytest.approx(1.0) and shifted["map50_95"] < 0.8
    far = detection_map(_perfect(shift=20.0), GT)
    assert far["map50"] < 0.5
    wrong_class = [dict(p, category_id=3 - p["category_id"]) for p in _perfect()]
    assert detection_map(wrong_class, GT) == {"map50": 0.0, "map50_95": 0.0}
    assert detection_map([], GT) == {"map50": 0.0, "map50_95": 0.0}
    # a path works, and the evaluation can be limited to some images
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(GT))
    only_first = [p for p in _perfect() if p["image_id"] == 1]
    assert detection_map(only_first, path, image_ids=[1])["map50"] == pytest.approx(1.0)
    assert detection_map(only_first, path)["map50"] < 1.0
    assert capsys.readouterr().out == ""  # pycocotools' narration is swallowed


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_recall_on_a_hand_made_matrix():
    # 3 images, 4 texts: image 0 owns texts 0 and 1, image 1 text 2, image 2 text 3.
    sim = torch.tensor([
        [0.1, 0.9, 0.0, 0.2],  # image 0: best text 1 (its own) -> i2t hit at 1
        [0.8, 0.1, 0.7, 0.0],  # image 1: best text 0 (not its own), its text 2 second
        [0.5, 0.4, 0.3, 0.2],  # image 2: its text 3 ranks last
    ])
    r = retrieval_recall(sim, [0, 0, 1, 2], ks=(1, 2, 5))
    assert r["i2t_r1"] == pytest.approx(1 / 3)
    assert r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r5"] == 1.0  # k beyond the candidates counts them all
    # text columns: t0 -> image 1 (wrong), t1 -> image 0 (right), t2 -> image 1 (right), t3 -> image 0 (wrong)
    assert r["t2i_r1"] == pytest.approx(0.5)
    assert r["t2i_r2"] == pytest.approx(0.75)  # t3's image 2 is third of three
    assert r["t2i_r5"] == 1.0
    assert retrieval_recall(torch.eye(4), [0, 1, 2, 3]) == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_recall(sim, [0, 1])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    shapes.write_dataset(root / "data", 4, seed=0, n_val=0, n_test=3, n_heldout=0, size=(32, 32), progress=False)
    bridge, tok, proc = tiny_bridge(num_loc_bins=16, num_quality_levels=2)
    bundle_dir = save_bundle(bridge, tok, proc, root / "bundle", qformer_tokenizer=tok)
    return root, load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def results(world):
    root, bundle = world
    return evaluate_bundle(bundle, root / "data", "test", batch_size=2, progress=False)


def test_evaluate_bundle_reports_every_section(world, results):
    """The sections and their bookkeeping on a random model (expected values of the figures themselves:
    the oracle and constant-model tests below)."""
    root, _ = world
    assert results["split"] == "test" and results["n_images"] == 3
    assert set(results["captions"]) == {"q0", "q1"}
    for entry in results["captions"].values():
        assert set(entry) >= {"bleu4", "cider", "precision", "recall", "mean_words"}
        assert len(entry["examples"]) == 3

    anns = json.loads((root / "data" / "annotations_vqa_test.json").read_text())["annotations"]
    vqa = results["vqa"]
    assert vqa["n_questions"] == len(anns)
    assert vqa["quality_level"] == "default"  # VQA and detection take no quality prompt
    per_type = {t: sum(a["question_type"] == t for a in anns) for t in vqa["per_question_type"]}
    assert sum(per_type.values()) == len(anns)  # every question counted under its type, once
    assert vqa["accuracy"] == pytest.approx(sum(vqa["per_question_type"][t] * n for t, n in per_type.items()) / len(anns))

    det = results["detection"]
    assert det["map50_95"] <= det["map50"]

    ret = results["retrieval"]
    assert ret["n_texts"] == 3  # the "normal" caption of each image
    assert ret["i2t_r5"] == 1.0 and ret["t2i_r5"] == 1.0  # 3 candidates: top 5 holds them all

    assert results["seconds"] > 0
    json.dumps(results)  # serialisable as it is
    md = report_markdown(results)
    assert "BLEU-4" in md and "mAP@0.5" in md and "R@1" in md and "| q1 |" in md


def test_per_task_functions_give_evaluate_bundles_sections(world, results):
    """Called directly on the same split, features and batch size, each task function returns exactly
    the section evaluate_bundle reports."""
    root, bundle = world
    data = load_split(root / "data", "test")
    assert data.image_ids == sorted(data.image_ids) and len(data.image_ids) == results["n_images"]
    feats = encode_split_images(bundle, root / "data", "test", data.images, batch_size=2)
    ids = data.image_ids
    assert evaluate_captions(bundle, feats, ids, data.caption_anns, scenes=data.scenes, batch_size=2) \
        == results["captions"]
    assert evaluate_vqa(bundle, feats, ids, data.questions, data.vqa_annotations, batch_size=2) == results["vqa"]
    assert evaluate_detection(bundle, feats, data.images, data.instances, batch_size=2) == results["detection"]
    assert retrieval_figures(bundle.bridge, bundle.qformer_tokenizer, feats, ids, data.caption_anns, 2) \
        == results["retrieval"]
    # one level on its own is that level's entry
    assert evaluate_captions(bundle, feats, ids, data.caption_anns, ["q1"], data.scenes, 2) \
        == {"q1": results["captions"]["q1"]}


def test_bundle_without_levels_locations_or_text_branch_skips_sections(world, tmp_path):
    root, _ = world
    bridge, tok, proc = tiny_bridge(with_text=False)
    bundle = load_bundle(save_bundle(bridge, tok, proc, tmp_path / "plain"))
    out = evaluate_bundle(bundle, root / "data", n=2, progress=False)
    assert out["n_images"] == 2 and set(out["captions"]) == {"default"}
    assert out["vqa"]["quality_level"] == "default"
    assert "skipped" in out["detection"] and "skipped" in out["retrieval"]
    assert "not run" in report_markdown(out)


def test_cli_writes_json_and_markdown(world, tmp_path, capsys):
    root, bundle = world
    out, md = tmp_path / "r" / "eval.json", tmp_path / "r" / "eval.md"
    rc = main(["--model", str(bundle.path), "--data", str(root / "data"), "--n", "2", "--levels", "q1",
               "--batch-size", "4", "--device", "cpu", "--out", str(out), "--markdown", str(md), "--quiet"])
    assert rc == 0
    written = json.loads(out.read_text())
    assert written["n_images"] == 2 and set(written["captions"]) == {"q1"}
    assert md.read_text() == report_markdown(written)
    assert "BLEU-4" in capsys.readouterr().out


def test_an_oracle_model_scores_perfectly(world, monkeypatch):
    """Wiring check: with generation replaced by the ground truth, every model-run figure is perfect.

    A random model never writes a well-formed box, so this is where decoding, label -> category
    mapping, pixel frame and xywh conversion meet COCOeval. The oracle knows only the bundle's own task
    prompts (not the default ones), so a perfect score also says the evaluation asked those.
    """
    root, _ = world
    data = root / "data"
    bridge, tok, proc = tiny_bridge(num_loc_bins=500)  # fine bins: boxes survive quantisation on 32 px images
    own = TaskPrompts(caption="", vqa="Question: {question} Short answer:", detect="boxes:")
    bridge.cfg = bridge.cfg.replace(prompts=own)
    bundle = Bundle(bridge, tok, proc, root, qformer_tokenizer=tok)
    scenes = {s["id"]: shapes.Scene.from_dict(s) for s in json.loads((data / "scenes_test.json").read_text())["scenes"]}
    questions = json.loads((data / "questions_test.json").read_text())["questions"]
    answers = {a["question_id"]: a["multiple_choice_answer"]
               for a in json.loads((data / "annotations_vqa_test.json").read_text())["annotations"]}
    truth = {(q["image_id"], own.vqa_prompt(q["question"])): answers[q["question_id"]] for q in questions}
    feats = {i: bridge.encode_images(proc(images=[load_rgb(data / "images" / "test" / f"{i:012d}.png")],
                                          return_tensors="pt").pixel_values)[0] for i in scenes}
    codec = BoxCodec(500)

    def oracle(bridge, tokenizer, vision_feats, prompts, quality=None, config=None):
        out = []
        for f, prompt in zip(vision_feats, prompts):
            image_id = min(feats, key=lambda i: (feats[i] - f).abs().max().item())
            scene = scenes[image_id]
            if prompt == own.caption_prompt():
                text = shapes.caption(scene, "normal")
            elif prompt == own.detect_prompt():
                text = codec.encode([(o.label, o.box) for o in scene.objects], scene.width, scene.height)
            else:
                text = truth[(image_id, prompt)]
            pieces = [p for p in re.split(r"(<loc_\d+>)", text) if p]
            out.append(Generated(text, [], [-0.1] * len(pieces), "stop", pieces))
        return out

    monkeypatch.setattr(ev, "generate", oracle)
    out = evaluate_bundle(bundle, data, progress=False)
    caps = out["captions"]["default"]
    assert caps["bleu4"] == pytest.approx(1.0, abs=1e-6) and caps["cider"] > 1.0
    assert caps["precision"] == 1.0 and caps["recall"] == 1.0
    assert out["vqa"]["accuracy"] == 1.0
    det = out["detection"]
    assert det["unknown_labels"] == 0 and det["n_detections"] == sum(len(s.objects) for s in scenes.values())
    assert det["map50"] == pytest.approx(1.0) and det["map50_95"] > 0.9


def test_detection_counts_each_parsed_box_once_known_or_unknown(world, monkeypatch):
    """Each image's detection text holds one box of a known category and one of a label the data does
    not have: the counts say exactly that, and only the known box reaches COCOeval."""
    root, bundle = world
    cfg = bundle.bridge.cfg
    data = root / "data"
    category = json.loads((data / "instances_test.json").read_text())["categories"][0]["name"]
    codec = BoxCodec(cfg.num_loc_bins)

    def fake(bridge, tokenizer, vision_feats, prompts, quality=None, config=None):
        out = []
        for prompt in prompts:
            text = (codec.encode([(category, (0, 0, 16, 16)), ("purple blob", (4, 4, 20, 20))], 32, 32)
                    if prompt == cfg.prompts.detect_prompt() else "yes")
            pieces = [p for p in re.split(r"(<loc_\d+>)", text) if p]
            out.append(Generated(text, [], [-0.1] * len(pieces), "stop", pieces))
        return out

    monkeypatch.setattr(ev, "generate", fake)
    det = evaluate_bundle(bundle, data, "test", progress=False)["detection"]
    assert (det["n_detections"], det["unknown_labels"]) == (3, 3)


def test_cli_refuses_a_missing_split_and_an_unknown_level(world, tmp_path, capsys):
    root, bundle = world
    with pytest.raises(SystemExit):
        main(["--model", str(bundle.path), "--data", str(root / "data"), "--split", "val2017"])
    assert "captions_val2017.json not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(bundle.path), "--data", str(root / "data"), "--levels", "best"])
    assert "unknown quality level 'best'" in capsys.readouterr().err


def test_a_model_that_always_says_yes_and_finds_each_first_object_scores_what_it_earns(world, monkeypatch):
    """Expected values, worked out from the data by hand: "yes" to every question scores the share of
    questions whose answer is yes (overall and per type); one exact box a scene (its first object in
    reading order) gives each category the COCO AP of perfect precision up to recall hits/objects,
    i.e. the share of the 101 recall thresholds at or below that recall."""
    root, _ = world
    data = root / "data"
    bridge, tok, proc = tiny_bridge(num_loc_bins=500)  # fine bins: the boxes survive quantisation exactly enough
    bundle = Bundle(bridge, tok, proc, root, qformer_tokenizer=tok)
    scenes = {s["id"]: shapes.Scene.from_dict(s) for s in json.loads((data / "scenes_test.json").read_text())["scenes"]}
    feats = {i: bridge.encode_images(proc(images=[load_rgb(data / "images" / "test" / f"{i:012d}.png")],
                                          return_tensors="pt").pixel_values)[0] for i in scenes}
    codec, prompts = BoxCodec(500), bridge.cfg.prompts

    def constant(bridge, tokenizer, vision_feats, asked, quality=None, config=None):
        out = []
        for f, prompt in zip(vision_feats, asked):
            scene = scenes[min(feats, key=lambda i: (feats[i] - f).abs().max().item())]
            first = shapes.reading_order(scene)[0]
            text = (codec.encode([(first.label, first.box)], scene.width, scene.height)
                    if prompt == prompts.detect_prompt() else "yes")
            pieces = [p for p in re.split(r"(<loc_\d+>)", text) if p]
            out.append(Generated(text, [], [-0.1] * len(pieces), "stop", pieces))
        return out

    monkeypatch.setattr(ev, "generate", constant)
    out = evaluate_bundle(bundle, data, progress=False)

    anns = json.loads((data / "annotations_vqa_test.json").read_text())["annotations"]
    assert all({x["answer"] for x in a["answers"]} == {a["multiple_choice_answer"]} for a in anns)  # one answer each
    yes = [a["multiple_choice_answer"] == "yes" for a in anns]
    assert 0 < sum(yes) < len(yes)  # the data can tell a right "yes" from a wrong one
    assert out["vqa"]["accuracy"] == pytest.approx(sum(yes) / len(yes))
    for qtype, acc in out["vqa"]["per_question_type"].items():
        of_type = [a["multiple_choice_answer"] == "yes" for a in anns if a["question_type"] == qtype]
        assert acc == pytest.approx(sum(of_type) / len(of_type)), qtype

    objects, hits = {}, {}
    for scene in scenes.values():
        for o in scene.objects:
            objects[o.label] = objects.get(o.label, 0) + 1
        first = shapes.reading_order(scene)[0].label
        hits[first] = hits.get(first, 0) + 1
    ap = [(int(100 * hits.get(label, 0) / n + 1e-9) + 1) / 101 if label in hits else 0.0
          for label, n in objects.items()]
    det = out["detection"]
    assert (det["n_detections"], det["unknown_labels"]) == (len(scenes), 0)
    assert det["map50"] == pytest.approx(sum(ap) / len(ap), abs=1e-6)
