"""The frozen LLM's ceiling: what it answers when its context holds the true scene (an oracle bridge).

    python -m training.demo.oracle --llm BUILD/llm --data BUILD/data --split val --n 200

The bridge puts its queries where the demo LLM learned to read a scene description (before ``<s>``). Here
that place holds the ground-truth description itself (``training.demo.pretrain.scene_description``), and the LLM
is asked the bridge's own task prompts, decoded greedily, and scored by the evaluation's own metric
functions (``training.evaluate``): scene-grounded caption precision/recall, VQA accuracy, detection mAP of
the parsed boxes. No bridge can pass on more than this; if it misses the gate, a bridge trained through
this LLM is noise, and ``qbridge demo build`` stops.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from qformer.boxes import DETECT_TOKENS_PER_OBJECT, BoxCodec
from qformer.prompts import caption_prompt, detect_prompt, vqa_prompt
from training.evaluate import (
    CAPTION_MAX_NEW_TOKENS, DETECT_SPARE_OBJECTS, VQA_MAX_NEW_TOKENS, detection_map,
    scene_caption_scores, vqa_scores,
)
from training.demo.pretrain import LOC_BINS, scene_description
from training.demo import vision
from training.demo.shapes import Scene

GATE = {"vqa_accuracy": 0.98, "caption_precision": 0.98, "detection_map50": 0.95}
# Questions answered by looking one object up (its colour, shape, size or place) rather than by counting.
LOOKUP_TYPES = ("colour", "shape", "size", "position")


def lookup_split(scores: dict, annotations: list[dict], scenes: dict) -> dict[str, float]:
    """VQA accuracy of the look-up questions (:data:`LOOKUP_TYPES`) in scenes of one object and of several.

    With one object any value of the asked kind is right; with several, the LLM must bind the value to the
    object the question names (the colour *of the diamond*). A gap between the two says the LLM picks a
    value of the right kind without binding it (0.5 is chance with two objects)."""
    out: dict[str, list[float]] = {"single": [], "multi": []}
    for a in annotations:
        if a.get("question_type") in LOOKUP_TYPES:
            out["multi" if len(scenes[a["image_id"]].objects) > 1 else "single"].append(scores[a["question_id"]])
    return {f"vqa_lookup_{k}_object": sum(v) / len(v) for k, v in out.items() if v}
_NUMBER = re.compile(r"\s*\b(\d+)\b")


def numbers_to_locations(text: str) -> str:
    """``red circle 12 40 30 61; ...`` (boxes as numbers, as the demo LLM writes them) -> the bridge's
    ``red circle<loc_12><loc_40><loc_30><loc_61>; ...``, so one parser reads both."""
    return _NUMBER.sub(lambda m: f"<loc_{m.group(1)}>", text)


@torch.no_grad()
def _generate(model, tokenizer, contexts: list[str], prompts: list[str], max_new_tokens: int,
              batch_size: int) -> list[str]:
    """Greedy continuations of ``context <s> prompt`` (left-padded batches)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ctx = tokenizer(contexts[i: i + batch_size], add_special_tokens=False)["input_ids"]
        txt = tokenizer(prompts[i: i + batch_size], add_special_tokens=True)["input_ids"]
        rows = [c + t for c, t in zip(ctx, txt)]
        width = max(map(len, rows))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return [t.strip() for t in out]


def evaluate_oracle(llm_dir: str | Path, data_dir: str | Path, split: str = "val", n: int | None = 200,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """The LLM's figures with the true scene as its context, on the first ``n`` scenes of ``split``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = Path(data_dir)
    read = lambda name: json.loads((data / f"{name}_{split}.json").read_text())  # noqa: E731
    scenes = sorted((Scene.from_dict(s) for s in read("scenes")["scenes"]), key=lambda s: s.id)[:n]
    by_id = {s.id: s for s in scenes}
    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    model = AutoModelForCausalLM.from_pretrained(str(llm_dir), use_safetensors=True).eval()
    desc = {s.id: scene_description(s, LOC_BINS) for s in scenes}
    bar = tqdm(total=3, desc="oracle", unit="task", disable=not progress)

    ids = [s.id for s in scenes]
    captions = _generate(model, tokenizer, [desc[i] for i in ids], [caption_prompt()] * len(ids),
                         CAPTION_MAX_NEW_TOKENS, batch_size)
    caption = scene_caption_scores(dict(zip(ids, captions)), by_id)
    bar.update()

    questions = [q for q in read("questions")["questions"] if q["image_id"] in by_id]
    answers = _generate(model, tokenizer, [desc[q["image_id"]] for q in questions],
                        [vqa_prompt(q["question"]) for q in questions], VQA_MAX_NEW_TOKENS, batch_size)
    preds = {q["question_id"]: a for q, a in zip(questions, answers)}
    annotations = [a for a in read("annotations_vqa")["annotations"] if a["question_id"] in preds]
    scores = vqa_scores(preds, annotations)
    per_type: dict[str, list[float]] = {}
    for a in annotations:
        per_type.setdefault(a.get("question_type", "unknown"), []).append(scores[a["question_id"]])
    bar.update()

    instances = read("instances")
    most = max(len(s.objects) for s in scenes)
    texts = _generate(model, tokenizer, [desc[i] for i in ids], [detect_prompt()] * len(ids),
                      DETECT_TOKENS_PER_OBJECT * (most + DETECT_SPARE_OBJECTS), batch_size)
    category = {c["name"]: c["id"] for c in instances["categories"]}
    codec, dets = BoxCodec(LOC_BINS), []
    for s, text in zip(scenes, texts):
        found = codec.decode(numbers_to_locations(text), s.width, s.height)
        for rank, d in enumerate(found):  # no token scores here: earlier boxes rank higher
            if d.label in category:
                x1, y1, x2, y2 = d.box
                dets.append({"image_id": s.id, "category_id": category[d.label], "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": 1.0 - rank / 100})
    detection = detection_map(dets, instances, ids)
    bar.update()
    bar.close()
    return {"split": split, "n_scenes": len(scenes), "vqa_accuracy": sum(scores.values()) / len(scores),
            "caption_precision": caption["precision"], "caption_recall": caption["recall"],
            "detection_map50": detection["map50"], "detection_map50_95": detection["map50_95"],
            **lookup_split(scores, annotations, by_id),
            "vqa_per_type": {t: sum(v) / len(v) for t, v in sorted(per_type.items())},
            "examples": {"caption": captions[0], "detect": texts[0], "context": desc[ids[0]]}}


def gate_failures(figures: dict, gate: dict[str, float] = GATE) -> list[str]:
    return vision.gate_failures(figures, gate)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo.oracle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", required=True, help="the frozen LLM's directory (model + tokenizer)")
    p.add_argument("--data", required=True, help="a written shapes world")
    p.add_argument("--split", default="val")
    p.add_argument("--n", type=int, default=200, help="scenes to score")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    figures = evaluate_oracle(args.llm, args.data, args.split, args.n)
    failures = gate_failures(figures)
    print(json.dumps({"figures": figures, "gate": GATE, "passed": not failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
