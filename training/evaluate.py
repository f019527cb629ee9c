"""Evaluate a bundle on a dataset split: captions, VQA, detection and retrieval, per quality level.

    qbridge eval --model BUNDLE --data data/shapes --split test --n 500 --out eval.json --markdown eval.md

The data directory has the layout ``training.demo.shapes.write_dataset`` writes (real data converted to
the same standard files works too)::

    captions_<split>.json          COCO captions; its "images" list defines the split (required)
    questions_<split>.json         VQAv2 questions       } VQA, when both exist
    annotations_vqa_<split>.json   VQAv2 annotations     }
    instances_<split>.json         COCO instances (detection, when it exists)
    scenes_<split>.json            shapes-world scenes (scene-grounded caption precision/recall)
    images/<split>/<file_name>

Every metric is a pure function of predictions and references, usable without a model:
:func:`caption_scores`, :func:`vqa_accuracy`, :func:`detection_map`, :func:`retrieval_recall`,
:func:`scene_caption_scores`. :func:`evaluate_bundle` runs the model on a split and calls them:
it reads the split (:func:`load_split`), encodes its images once (:func:`encode_split_images`), and
runs one function per task on those frozen features, each returning its section of the result:
:func:`evaluate_captions` (per quality level), :func:`evaluate_vqa`, :func:`evaluate_detection` and
:func:`retrieval_figures`. :func:`report_markdown` renders the result. All figures are fractions
(CIDEr in its own units, where 1.0 is a good score); the printed tables show them x100, as papers do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qformer.boxes import DETECT_TOKENS_PER_OBJECT, BoxCodec
from qformer.generation import GenerationConfig, generate
from qformer.qformer import AttentionMode
from training.datasets import load_rgb
from training.demo.shapes import Scene, caption_precision_recall

CAPTION_MAX_NEW_TOKENS = 40
VQA_MAX_NEW_TOKENS = 5  # answers are one or two words; VQAv2 answers rarely run longer
# Budget per object in a detection sequence: up to 6 label tokens, 4 location tokens, 1 separator.
DETECT_SPARE_OBJECTS = 2  # room for a model that lists more objects than the busiest scene has
RETRIEVAL_MAX_LENGTH = 64


# ============================================================================ captions


def caption_tokens(text: str) -> str:
    """Lower-case words with punctuation removed, space-joined (what BLEU/CIDEr count).

    The usual COCO pipeline runs pycocoevalcap's PTBTokenizer, which starts a Java process
    (Stanford CoreNLP); qbridge must evaluate on machines without a JRE, so this small Python
    tokenizer stands in. It keeps words and numbers (and an apostrophe inside a word, where PTB
    would split "don't" into "do n't"), so scores on real COCO may differ from published,
    PTB-tokenised ones in the last digit; on the shapes world (no punctuation inside words) they
    are the same.
    """
    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)*", text.lower()))


def caption_scores(predictions: Mapping, references: Mapping) -> dict[str, float]:
    """BLEU-4 and CIDEr-D (pycocoevalcap) of one caption per image against its references.

    ``predictions``: image id -> caption; ``references``: image id -> list of captions (every
    predicted image needs at least one). CIDEr's document frequencies come from the references of
    all the predicted images, so score a whole split at once, never image by image.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return {"bleu4": 0.0, "cider": 0.0}
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"no reference captions for image ids {missing[:10]}")
    res = {k: [caption_tokens(v)] for k, v in predictions.items()}
    gts = {k: [caption_tokens(r) for r in references[k]] for k in predictions}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def scene_caption_scores(predictions: Mapping, scenes: Mapping) -> dict[str, float]:
    """Scene-grounded precision and recall (``training.demo.shapes.caption_precision_recall``),
    averaged over images. ``scenes``: image id -> :class:`training.demo.shapes.Scene` (or its dict)."""
    if not predictions:
        return {"precision": 0.0, "recall": 0.0}
    ps, rs = [], []
    for image_id, text in predictions.items():
        scene = scenes[image_id]
        p, r = caption_precision_recall(text, scene if isinstance(scene, Scene) else Scene.from_dict(scene))
        ps.append(p)
        rs.append(r)
    return {"precision": sum(ps) / len(ps), "recall": sum(rs) / len(rs)}


# ============================================================================ VQA

# Answer normalisation of the official VQA evaluation (GT-Vision-Lab/VQA, vqaEvaluation/vqaEval.py),
# written compactly: the same punctuation list and rules, number words, articles; the contraction
# table keeps the common entries of the official one (which also lists rarities like "y'all'd've").
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official pattern "(?!<=\d)(\.)(?!\d)" has a typo'd look-behind that never applies, so in effect
# it removes every period not followed by a digit ("2." -> "2", "1.5" stays); we state that directly.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                             "nine", "ten"))}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "isnt": "isn't", "itd": "it'd", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "somebodys": "somebody's",
    "someones": "someone's", "somethings": "something's", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}


def _vqa_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # As the official code: tested on the input text, applied to the running output.
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation of a predicted answer: "Two." -> "2", "a dog" -> "dog"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_scores(predictions: Mapping, annotations: Sequence[Mapping]) -> dict:
    """Per-question VQAv2 accuracy: question id -> score in [0, 1].

    For each of the 10 leave-one-annotator-out subsets, ``min(1, #annotators in it who gave the
    answer / 3)``; the score is their mean (so 2 of 10 humans -> 0.6, 3 -> 0.9, 4+ -> 1.0). As in
    the official tools, the prediction is normalised fully and the human answers only have
    whitespace stripped, plus punctuation handling when they disagree (VQAv2's human answers are
    already normalised). Breakdowns by question type use these means; the official tools use the
    last subset's score there, a quirk that only matters when annotators disagree.
    """
    by_id = {a["question_id"]: a for a in annotations}
    out = {}
    for qid, predicted in predictions.items():
        if qid not in by_id:
            raise ValueError(f"no annotation for question id {qid!r}")
        pred = normalize_answer(predicted)
        gts = [a["answer"].replace("\n", " ").replace("\t", " ").strip() for a in by_id[qid]["answers"]]
        if len(set(gts)) > 1:
            gts = [_vqa_punctuation(g) for g in gts]
        matches = [g == pred for g in gts]
        total = sum(matches)
        # leaving out annotator i removes one match exactly when annotator i gave the answer
        accs = [min(1.0, (total - m) / 3) for m in matches]
        out[qid] = sum(accs) / len(accs) if accs else 0.0
    return out


def vqa_accuracy(predictions: Mapping, annotations: Sequence[Mapping]) -> float:
    """Mean VQAv2 accuracy over the predicted questions (see :func:`vqa_scores`); 0.0 for none."""
    scores = vqa_scores(predictions, annotations)
    return sum(scores.values()) / len(scores) if scores else 0.0


# ============================================================================ detection


def _coco(dataset: dict):
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detection_map(predictions: Sequence[Mapping], instances, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Box mAP@0.5 and mAP@[.5:.95] (pycocotools COCOeval, 100 detections per image).

    ``predictions``: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``;
    ``instances``: a COCO instances JSON path or its dict. ``image_ids`` restricts the evaluation
    to those images (default: every image of ``instances``, so unpredicted images count as misses).
    No predictions give 0.0; so does a set of images without any ground-truth box (where COCOeval
    reports -1, "undefined").
    """
    from pycocotools.cocoeval import COCOeval

    if not isinstance(instances, Mapping):
        with open(instances, encoding="utf-8") as f:
            instances = json.load(f)
    if not predictions:
        return {"map50": 0.0, "map50_95": 0.0}
    gt = _coco(instances)
    dets = [dict(p, bbox=[float(v) for v in p["bbox"]], score=float(p["score"])) for p in predictions]  # loadRes edits
    with contextlib.redirect_stdout(io.StringIO()):  # COCOeval narrates every step
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    map50_95, map50 = float(ev.stats[0]), float(ev.stats[1])
    return {"map50": max(map50, 0.0), "map50_95": max(map50_95, 0.0)}


# ============================================================================ retrieval


def retrieval_recall(sim: torch.Tensor, text_to_image: Sequence[int], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k both ways from a similarity matrix ``sim`` (n_images, n_texts).

    ``text_to_image[t]`` is the row of text ``t``'s image. Image->text: a hit when any of the
    image's texts is among its top k (images without a text are not counted). Text->image: a hit
    when the text's image is among its top k. k larger than the candidates counts all of them.
    """
    n_images, n_texts = sim.shape
    if len(text_to_image) != n_texts:
        raise ValueError(f"{len(text_to_image)} text_to_image entries for {n_texts} texts")
    owner = torch.as_tensor(list(text_to_image), dtype=torch.long)
    sim = sim.float().cpu()
    has_text = torch.zeros(n_images, dtype=torch.bool)
    has_text[owner] = True
    out = {}
    for k in ks:
        top_texts = sim.topk(min(k, n_texts), dim=1).indices  # (n_images, k)
        i2t = (owner[top_texts] == torch.arange(n_images)[:, None]).any(dim=1)[has_text]
        top_images = sim.t().topk(min(k, n_images), dim=1).indices  # (n_texts, k)
        t2i = (top_images == owner[:, None]).any(dim=1)
        out[f"i2t_r{k}"] = i2t.float().mean().item() if i2t.numel() else 0.0
        out[f"t2i_r{k}"] = t2i.float().mean().item() if t2i.numel() else 0.0
    return out


# ============================================================================ running a bundle


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _is_clean(ann: Mapping) -> bool:
    return ann.get("noise", "none") in ("none", None, False, "")


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _level_name(cfg, level: int | None) -> str:
    return "default" if level is None else cfg.quality_name(level)


def task_quality(cfg) -> int | None:
    """Quality level used for VQA and detection: none.

    Levels grade caption-image alignment; stage 2 trains VQA and detection without a quality prompt
    (their targets are clean annotations), so they are evaluated and served the same way.
    """
    return None


def caption_levels(cfg, levels: Sequence[int | str] | None = None) -> list[int | None]:
    """Quality levels to caption at: ``levels`` (names or numbers) resolved, or every level of the
    model; ``[None]`` (once without a level) for a model without levels."""
    if levels is None:
        return list(range(cfg.num_quality_levels)) or [None]
    return [cfg.quality_level(lv) for lv in levels]


@dataclass
class EvalSplit:
    """What :func:`evaluate_bundle` evaluates on: the first ``n`` images (by id) of a split, and the
    annotations of those images the data directory has (``None`` / ``[]`` where a file is missing)."""

    images: list[dict]  # COCO image records, by id
    caption_anns: list[dict]  # clean caption annotations of these images
    questions: list[dict]  # VQA questions of these images, by question id; [] without both VQA files
    vqa_annotations: list[dict] | None  # the split's VQA annotations, read when there are questions
    instances: dict | None  # COCO instances JSON
    scenes: dict[int, Scene] | None  # shapes-world scenes of these images

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]


def load_split(data_dir: str | Path, split: str = "test", n: int | None = None) -> EvalSplit:
    """Read the first ``n`` images (by id; default all) of ``split`` and their annotations (layout: see
    the module docstring). Raises ``ValueError`` when that leaves no image."""
    data_dir = Path(data_dir)
    captions_json = _read_json(data_dir / f"captions_{split}.json")
    images = sorted(captions_json["images"], key=lambda im: im["id"])[: n if n is not None else None]
    if not images:
        raise ValueError(f"no images in {data_dir / f'captions_{split}.json'}" + (f" (n={n})" if n is not None else ""))
    wanted = {im["id"] for im in images}
    caption_anns = [a for a in captions_json["annotations"] if a["image_id"] in wanted and _is_clean(a)]

    files = {k: data_dir / f"{k}_{split}.json" for k in ("questions", "annotations_vqa", "instances", "scenes")}
    questions, vqa_annotations = [], None
    if files["questions"].is_file() and files["annotations_vqa"].is_file():
        questions = sorted((q for q in _read_json(files["questions"])["questions"] if q["image_id"] in wanted),
                           key=lambda q: q["question_id"])
        if questions:
            vqa_annotations = _read_json(files["annotations_vqa"])["annotations"]
    instances = _read_json(files["instances"]) if files["instances"].is_file() else None
    scenes = None
    if files["scenes"].is_file():
        scenes = {s["id"]: Scene.from_dict(s) for s in _read_json(files["scenes"])["scenes"] if s["id"] in wanted}
    return EvalSplit(images, caption_anns, questions, vqa_annotations, instances, scenes)


def _device(bundle):
    return next(bundle.bridge.parameters()).device


def _step(bar, description: str | None = None) -> None:
    """Advance the progress bar (``None``: none) one batch, or set its description."""
    if bar is None:
        return
    if description is None:
        bar.update()
    else:
        bar.set_description(description)


@torch.no_grad()
def encode_split_images(bundle, data_dir: str | Path, split: str, images: Sequence[Mapping], batch_size: int = 16,
                        device=None, bar=None) -> torch.Tensor:
    """The frozen features ``(n_images, N, Dv)`` of ``images`` (COCO records; files under
    ``images/<split>/``), in that order, on the CPU; one ``bar`` step per batch."""
    bridge, device = bundle.bridge.eval(), _device(bundle) if device is None else device
    feats = []
    for batch in _batches(images, batch_size):
        pil = [load_rgb(Path(data_dir) / "images" / split / im["file_name"]) for im in batch]
        pixels = bundle.image_processor(images=pil, return_tensors="pt").pixel_values.to(device)
        feats.append(bridge.encode_images(pixels).cpu())
        _step(bar)
    return torch.cat(feats)


def _generate_rows(bundle, feats: torch.Tensor, rows: list[int], prompts: list[str], quality: int | None,
                   max_new_tokens: int, batch_size: int, device, bar) -> list:
    """Greedy generation for rows of ``feats`` and their prompts, in batches (one ``bar`` step each)."""
    out = []
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    for b in range(0, len(rows), batch_size):
        r, p = rows[b : b + batch_size], prompts[b : b + batch_size]
        q = [quality] * len(r) if quality is not None else None
        out += generate(bundle.bridge, bundle.tokenizer, feats[r].to(device), p, q, config)
        _step(bar)
    return out


@torch.no_grad()
def evaluate_captions(bundle, feats: torch.Tensor, image_ids: Sequence[int], caption_anns: Sequence[Mapping],
                      levels: Sequence[int | str] | None = None, scenes: Mapping | None = None, batch_size: int = 16,
                      device=None, bar=None) -> dict:
    """Captions of every image, generated greedily at each of :func:`caption_levels`, scored against
    ``caption_anns`` (and ``scenes``, image id -> scene, when given). ``feats``: the images' frozen
    features, in ``image_ids`` order. Returns level name -> figures, mean length and three examples."""
    bundle.bridge.eval()
    cfg, device = bundle.config, _device(bundle) if device is None else device
    references: dict[int, list[str]] = defaultdict(list)
    for a in caption_anns:
        references[a["image_id"]].append(a["caption"])
    rows = list(range(len(image_ids)))
    prompt = cfg.prompts.caption_prompt()  # the bundle's own: a model is scored in the words it was trained with
    out = {}
    for level in caption_levels(cfg, levels):
        _step(bar, f"eval: captions {_level_name(cfg, level)}")
        gens = _generate_rows(bundle, feats, rows, [prompt] * len(rows), level,
                              CAPTION_MAX_NEW_TOKENS, batch_size, device, bar)
        preds = {image_ids[i]: g.text for i, g in zip(rows, gens)}
        scored = {k: v for k, v in preds.items() if references.get(k)}
        entry = caption_scores(scored, references)
        if scenes is not None:
            entry.update(scene_caption_scores({k: v for k, v in preds.items() if k in scenes}, scenes))
        entry["mean_words"] = sum(len(t.split()) for t in preds.values()) / len(preds)
        entry["examples"] = {str(k): preds[k] for k in image_ids[:3]}
        out[_level_name(cfg, level)] = entry
    return out


@torch.no_grad()
def evaluate_vqa(bundle, feats: torch.Tensor, image_ids: Sequence[int], questions: Sequence[Mapping],
                 annotations: Sequence[Mapping], batch_size: int = 16, device=None, bar=None) -> dict:
    """VQAv2 accuracy of greedy answers to ``questions`` (about images of ``image_ids``, whose frozen
    features ``feats`` holds in that order), overall and per question and answer type, at
    :func:`task_quality`. ``annotations``: VQAv2 annotations covering the questions."""
    if not questions:
        return {"skipped": "no questions for these images"}
    bundle.bridge.eval()
    cfg, device = bundle.config, _device(bundle) if device is None else device
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    _step(bar, "eval: vqa")
    quality = task_quality(cfg)
    asked = [cfg.prompts.vqa_prompt(q["question"]) for q in questions]
    gens = _generate_rows(bundle, feats, [row_of[q["image_id"]] for q in questions], asked, quality,
                          VQA_MAX_NEW_TOKENS, batch_size, device, bar)
    preds = {q["question_id"]: g.text for q, g in zip(questions, gens)}
    annotations = [a for a in annotations if a["question_id"] in preds]
    scores = vqa_scores(preds, annotations)
    groups: dict[str, dict[str, list[float]]] = {"question_type": defaultdict(list), "answer_type": defaultdict(list)}
    for a in annotations:
        for key, group in groups.items():
            group[a.get(key, "unknown")].append(scores[a["question_id"]])
    return {
        "accuracy": sum(scores.values()) / len(scores),
        "n_questions": len(scores),
        "quality_level": _level_name(cfg, quality),
        **{f"per_{key}": {t: sum(v) / len(v) for t, v in sorted(group.items())} for key, group in groups.items()},
    }


@torch.no_grad()
def evaluate_detection(bundle, feats: torch.Tensor, images: Sequence[Mapping], instances: Mapping,
                       batch_size: int = 16, device=None, bar=None) -> dict:
    """Box mAP of the boxes parsed from greedy detection sequences of ``images`` (COCO records with
    width and height; ``feats``: their frozen features, in that order) against ``instances`` (COCO
    instances), at :func:`task_quality`; counts parsed boxes and those with an unknown label."""
    cfg = bundle.config
    if cfg.num_loc_bins == 0:
        return {"skipped": "the model has no location tokens"}
    bundle.bridge.eval()
    device = _device(bundle) if device is None else device
    image_ids = [im["id"] for im in images]
    wanted = set(image_ids)
    _step(bar, "eval: detect")
    quality = task_quality(cfg)
    per_image = defaultdict(int)
    for a in instances["annotations"]:
        if a["image_id"] in wanted:
            per_image[a["image_id"]] += 1
    max_new = DETECT_TOKENS_PER_OBJECT * (max(per_image.values(), default=0) + DETECT_SPARE_OBJECTS)
    rows = list(range(len(images)))
    gens = _generate_rows(bundle, feats, rows, [cfg.prompts.detect_prompt()] * len(rows), quality, max_new,
                          batch_size, device, bar)
    category = {" ".join(c["name"].lower().split()): c["id"] for c in instances["categories"]}
    codec = BoxCodec(cfg.num_loc_bins)
    dets, unknown = [], 0
    for im, g in zip(images, gens):
        # Boxes in the frame of the annotations: the JSON's width/height (the original image).
        for d in codec.decode_tokens(g.tokens, g.logprobs, im["width"], im["height"]):
            cat = category.get(d.label.lower())
            if cat is None:
                unknown += 1
                continue
            x1, y1, x2, y2 = d.box
            dets.append({"image_id": im["id"], "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": d.score})
    return {
        **detection_map(dets, instances, image_ids),
        "n_detections": len(dets),
        "unknown_labels": unknown,
        "quality_level": _level_name(cfg, quality),
    }


@torch.no_grad()
def evaluate_bundle(
    bundle,
    data_dir: str | Path,
    split: str = "test",
    n: int | None = None,
    batch_size: int = 16,
    levels: Sequence[int | str] | None = None,
    progress: bool = True,
) -> dict:
    """Run ``bundle`` on the first ``n`` images (by id) of ``split`` and score every task it has.

    Images are encoded once; the frozen features serve every task: :func:`evaluate_captions` (at each
    quality level in ``levels``; default all), :func:`evaluate_vqa`, :func:`evaluate_detection` (when
    the model has location tokens) and :func:`retrieval_figures` (when it keeps the Q-Former text
    branch and the bundle has its tokenizer). A section that cannot run holds ``{"skipped": reason}``.
    Returns a JSON-serialisable dict.
    """
    start = time.perf_counter()
    data_dir = Path(data_dir)
    bridge, cfg = bundle.bridge.eval(), bundle.config
    device = next(bridge.parameters()).device
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    data = load_split(data_dir, split, n)
    image_ids = data.image_ids

    n_levels = len(caption_levels(cfg, levels))
    run_detection = cfg.num_loc_bins > 0 and data.instances is not None
    has_text = bridge.aligner.qformer.cfg.with_text
    run_retrieval = has_text and bundle.qformer_tokenizer is not None

    def n_batches(count: int) -> int:
        return math.ceil(count / batch_size)

    total = n_batches(len(data.images)) * (1 + n_levels + run_detection) + n_batches(len(data.questions))
    bar = tqdm(total=total, desc="eval", unit="batch", disable=not progress)

    # frozen features, once (kept on the CPU so long splits do not fill the accelerator)
    bar.set_description("eval: encode")
    feats = encode_split_images(bundle, data_dir, split, data.images, batch_size, device, bar)  # (n_images, N, Dv)

    results: dict = {"split": split, "n_images": len(data.images)}
    results["captions"] = evaluate_captions(bundle, feats, image_ids, data.caption_anns, levels, data.scenes,
                                            batch_size, device, bar)
    if data.questions:
        results["vqa"] = evaluate_vqa(bundle, feats, image_ids, data.questions, data.vqa_annotations, batch_size,
                                      device, bar)
    else:
        results["vqa"] = {"skipped": f"no questions_{split}.json / annotations_vqa_{split}.json for these images"}
    if run_detection:
        results["detection"] = evaluate_detection(bundle, feats, data.images, data.instances, batch_size, device, bar)
    else:
        why = "the model has no location tokens" if cfg.num_loc_bins == 0 else f"no instances_{split}.json"
        results["detection"] = {"skipped": why}
    if run_retrieval:
        bar.set_description("eval: retrieval")
        results["retrieval"] = retrieval_figures(bridge, bundle.qformer_tokenizer, feats, image_ids,
                                                 data.caption_anns, batch_size, device)
    else:
        why = "the Q-Former has no text branch" if not has_text else "the bundle has no qformer_tokenizer"
        results["retrieval"] = {"skipped": why}
    bar.close()
    results["seconds"] = round(time.perf_counter() - start, 3)
    return results


def retrieval_figures(bridge, qformer_tokenizer, feats: torch.Tensor, image_ids: list[int], caption_anns: list[dict],
                      batch_size: int = 64, device="cpu") -> dict:
    """ITC retrieval: query features against TEXT-mode [CLS] features of the split's clean captions
    (``feats``: the images' frozen features, in ``image_ids`` order)."""
    # One detail level if the data has levels, so every image has the same number of candidates.
    anns = [a for a in caption_anns if a.get("level") == "normal"] or caption_anns
    if not anns:
        return {"skipped": "no captions for these images"}
    row_of = {image_id: i for i, image_id in enumerate(image_ids)}
    texts = [a["caption"] for a in anns]
    owner = [row_of[a["image_id"]] for a in anns]

    aligner = bridge.aligner  # the stage-1 copy when the bundle carries one
    image_feats = torch.cat([
        aligner.qformer.image_features(aligner.query_output(feats[b : b + batch_size].to(device))).float().cpu()
        for b in range(0, len(feats), batch_size)
    ])  # (n_images, Q, E)
    text_feats = []
    for b in range(0, len(texts), batch_size):
        enc = qformer_tokenizer(texts[b : b + batch_size], padding=True, truncation=True,
                                       max_length=RETRIEVAL_MAX_LENGTH, return_tensors="pt")  # its own padding side, as trained
        out = aligner.qformer(AttentionMode.TEXT, input_ids=enc.input_ids.to(device),
                              attention_mask=enc.attention_mask.to(device))
        text_feats.append(aligner.qformer.text_features(out.text_output).float().cpu())  # (b, E)
    sim = aligner.qformer.similarity(image_feats, torch.cat(text_feats))  # (n_images, n_texts)
    return {**retrieval_recall(sim, owner), "n_texts": len(texts)}


# ============================================================================ reports


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_markdown(results: dict) -> str:
    """Markdown tables of an :func:`evaluate_bundle` result (figures x100, lengths in words)."""
    lines = [f"Split `{results['split']}`, {results['n_images']} images"
             + (f", {results['seconds']:.1f} s" if "seconds" in results else "") + ". Figures x100.", ""]
    lines += ["| captions: level | BLEU-4 | CIDEr | precision | recall | words |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in results["captions"].items():
        lines.append(f"| {name} | {_pct(c['bleu4'])} | {_pct(c['cider'])} | {_pct(c.get('precision'))} "
                     f"| {_pct(c.get('recall'))} | {c['mean_words']:.1f} |")
    lines.append("")

    vqa = results["vqa"]
    if "skipped" in vqa:
        lines += [f"VQA: not run ({vqa['skipped']}).", ""]
    else:
        lines += [f"| VQA (level {vqa['quality_level']}) | accuracy | questions |", "|---|---:|---:|",
                  f"| all | {_pct(vqa['accuracy'])} | {vqa['n_questions']} |"]
        lines += [f"| {t} | {_pct(v)} | |" for t, v in vqa["per_question_type"].items()]
        lines.append("")

    det = results["detection"]
    if "skipped" in det:
        lines += [f"Detection: not run ({det['skipped']}).", ""]
    else:
        lines += [f"| detection (level {det['quality_level']}) | mAP@0.5 | mAP@[.5:.95] | boxes |",
                  "|---|---:|---:|---:|",
                  f"| all | {_pct(det['map50'])} | {_pct(det['map50_95'])} | {det['n_detections']} |", ""]

    ret = results["retrieval"]
    if "skipped" in ret:
        lines += [f"Retrieval: not run ({ret['skipped']}).", ""]
    else:
        lines += ["| retrieval | R@1 | R@5 |", "|---|---:|---:|",
                  f"| image -> text | {_pct(ret['i2t_r1'])} | {_pct(ret['i2t_r5'])} |",
                  f"| text -> image | {_pct(ret['t2i_r1'])} | {_pct(ret['t2i_r5'])} |", ""]
    return "\n".join(lines)


# ============================================================================ CLI


def main(argv: list[str] | None = None) -> int:
    """Evaluate a bundle on a dataset split: captions, VQA, detection, retrieval."""
    p = argparse.ArgumentParser(
        prog="qbridge eval",
        description=main.__doc__ + " Prints Markdown tables (figures x100); writes JSON with --out. Sections the "
        "model or the data cannot support (no location tokens, no Q-Former text branch, no VQA files) are skipped.",
        epilog="example: qbridge eval --model demo/bundle --data data/shapes --split test --n 500 --out eval.json")
    p.add_argument("--model", required=True, metavar="BUNDLE", help="bundle directory")
    p.add_argument("--data", required=True, type=Path, metavar="DIR",
                   help="dataset directory in the shapes-world layout (captions_<split>.json, images/<split>/, ...)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--n", type=int, default=None, metavar="N", help="the first N images by id (default: all)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="images (or questions) per generation batch (default: 16)")
    p.add_argument("--levels", default=None, metavar="L1,L2",
                   help="caption quality levels, names or numbers (default: every level)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="write the results as JSON here")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE.md", help="write the Markdown report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")

    if not (args.data / f"captions_{args.split}.json").is_file():
        p.error(f"{args.data / f'captions_{args.split}.json'} not found: --data must hold the split's captions JSON")

    from qformer.bundle import load_bundle

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle = load_bundle(args.model, device=device)
    levels = None
    if args.levels:
        levels = [int(v) if v.strip().isdigit() else v.strip() for v in args.levels.split(",") if v.strip()]
        try:
            for level in levels:
                bundle.config.quality_level(level)
        except ValueError as exc:
            p.error(f"--levels: {exc}")
    results = evaluate_bundle(bundle, args.data, args.split, args.n, args.batch_size, levels, progress=not args.quiet)
    report = report_markdown(results)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
