"""A shapes-world task the demo was never trained on, for prompt tuning: "which colour is the largest object?"

Written in VQA format beside the demo's data (`questions_largest_{split}.json`,
`annotations_largest_{split}.json`), one question per scene whose largest object (box area) is at least
`margin` times the next one, so that the answer is not a judgement call. Then:

    python -m training.demo.new_task --data build/demo/data
    qbridge train prompt --model qformer/demo/bundle --data build/demo/data --name largest-colour \\
        --questions 'questions_largest_{split}.json' --answers 'annotations_largest_{split}.json'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.demo.shapes import Obj, Scene

QUESTION = "which colour is the largest object?"
QUESTION_TYPE = "largest colour"
DESCRIPTION = "the colour of the largest object (prompt tuning; the demo never trained on this question)"
FILES = ("questions_largest_{split}.json", "annotations_largest_{split}.json")


def area(o: Obj) -> int:
    x1, y1, x2, y2 = o.box
    return (x2 - x1) * (y2 - y1)


def largest_colour(scene: Scene, margin: float = 1.3) -> str | None:
    """The colour of the largest object, or None when the runner-up is within `margin` of it."""
    ranked = sorted(scene.objects, key=area, reverse=True)
    if len(ranked) > 1 and area(ranked[0]) < margin * area(ranked[1]):
        return None
    return ranked[0].colour


def write_task(data_dir: str | Path, splits=("train", "val", "test", "heldout"), margin: float = 1.3) -> dict[str, int]:
    """Write the task's files for each split that has scenes; returns questions per split."""
    data = Path(data_dir)
    counts = {}
    for split in splits:
        scenes_file = data / f"scenes_{split}.json"
        if not scenes_file.is_file():
            continue
        questions, annotations = [], []
        for s in json.loads(scenes_file.read_text())["scenes"]:
            scene = Scene.from_dict(s)
            answer = largest_colour(scene, margin)
            if answer is None:
                continue
            qid = scene.id * 1000 + 999  # beside the world's own question ids (scene * 1000 + k, k < 999)
            questions.append({"image_id": scene.id, "question": QUESTION, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": scene.id, "question_type": QUESTION_TYPE,
                                "answer_type": "other", "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": a + 1}
                                            for a in range(10)]})
        q_file, a_file = (data / f.format(split=split) for f in FILES)
        q_file.write_text(json.dumps({"questions": questions}))
        a_file.write_text(json.dumps({"annotations": annotations}))
        counts[split] = len(questions)
    if not counts:
        raise FileNotFoundError(f"no scenes_<split>.json in {data}: write the shapes data first (`qbridge data shapes`)")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo.new_task", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the shapes-world data directory (scenes_<split>.json)")
    p.add_argument("--margin", type=float, default=1.3, help="the largest object's area over the next (default 1.3)")
    args = p.parse_args(argv)
    for split, n in write_task(args.data, margin=args.margin).items():
        print(f"{split}: {n} questions -> {args.data}/{FILES[0].format(split=split)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
