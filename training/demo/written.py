"""What a demo bridge writes where the frozen LLM reads: its queries read back as tokens.

    python -m training.demo.written --model qformer/demo/bundle --data BUILD/data --split test --n 200

The demo's stage 2 teaches query slot ``s`` to write the LLM's input row of token ``s`` of the scene's
description (context distillation, ``training.losses.context_loss``). Here each slot of a bridge's projected
queries is read back as its nearest row of the LLM's input table and compared with the true description
(``training.demo.pretrain.scene_description``), token by token, by kind: the row and column words, the size,
the other words (background, colour, shape, full stops) and the numbers (box corners in location bins), with
how far a wrong number lands from the right one; and by object (the background, then the k-th object in
reading order). The oracle gate (``training.demo.oracle``) says what the LLM
makes of a perfect description; this says how far the bridge's is from perfect, and where.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from training.demo.pretrain import LOC_BINS, scene_description
from training.demo.shapes import COLS, ROWS, SIZES
from training.evaluate import encode_split_images, load_split

KINDS = ("row", "column", "size", "word", "number")
_KIND_OF = {**{w: "row" for w in ROWS}, **{w: "column" for w in COLS}, **{w: "size" for w in SIZES}}
NUMBER_ERRORS = (1, 2, 3, 4, 5)  # |written - true| in bins; 5 counts five and more


def token_kind(token: str) -> str:
    """The kind of a description token (a byte-level BPE piece, ``Ġ`` for a leading space)."""
    word = token.lstrip("Ġ")
    return "number" if word.isdigit() else _KIND_OF.get(word, "word")


def compare(written: list[str], true: list[str]) -> tuple[Counter, Counter, Counter]:
    """Per kind: (tokens, wrong tokens) of ``written`` against ``true`` slot by slot, and the distance of each
    wrong number that was written as a number (capped at 5)."""
    total, wrong, off = Counter(), Counter(), Counter()
    for w, t in zip(written, true):
        kind = token_kind(t)
        total[kind] += 1
        if w != t:
            wrong[kind] += 1
            if kind == "number" and token_kind(w) == "number":
                off[min(abs(int(w.lstrip("Ġ")) - int(t.lstrip("Ġ"))), NUMBER_ERRORS[-1])] += 1
    return total, wrong, off


def by_object(written: list[str], true: list[str]) -> tuple[Counter, Counter]:
    """(tokens, wrong tokens) of ``written`` against ``true`` per described object: key 0 is the background,
    key k the k-th object in reading order (a full stop ends each). A rise of errors with k says the queries
    find the first objects and lose track of the later ones (reading order is the hard part), an even spread
    that they find every object but write its details imprecisely."""
    total, wrong = Counter(), Counter()
    k = 0
    for w, t in zip(written, true):
        total[k] += 1
        wrong[k] += w != t
        k += t == "."
    return total, wrong


@torch.no_grad()
def written_context(bundle, data_dir: str | Path, split: str = "test", n: int | None = 200, batch_size: int = 32,
                    progress: bool = True) -> dict:
    """Token accuracy of the bridge's written description on the first ``n`` scenes of ``split``: overall
    (``accuracy``), per kind (``<kind>_accuracy``), whole scenes written exactly (``exact_scenes``), the
    share of wrong numbers by distance (``number_off_<d>``), and one example."""
    split_data = load_split(data_dir, split, n)
    if not split_data.scenes:
        raise ValueError(f"{data_dir} has no scenes_{split}.json: the written context is read against the scenes")
    bridge, tokenizer = bundle.bridge.eval(), bundle.tokenizer
    table = bridge.base_input_embeddings().float()
    total, wrong, off = Counter(), Counter(), Counter()
    per_object, wrong_per_object = Counter(), Counter()
    exact, example = 0, None
    images = split_data.images
    for i in tqdm(range(0, len(images), batch_size), desc="written context", unit="batch", disable=not progress):
        chunk = images[i: i + batch_size]
        feats = encode_split_images(bundle, data_dir, split, chunk, batch_size, device=table.device)
        queries = bridge.project_queries(feats.to(table.device)).float()
        nearest = torch.cdist(queries, table[None].expand(len(chunk), -1, -1)).argmin(-1)
        for im, row in zip(chunk, nearest.tolist()):
            true = tokenizer.convert_ids_to_tokens(
                tokenizer(scene_description(split_data.scenes[im["id"]], LOC_BINS), add_special_tokens=False)["input_ids"])
            written = tokenizer.convert_ids_to_tokens(row[: len(true)])
            t, w, o = compare(written, true)
            total, wrong, off = total + t, wrong + w, off + o
            t, w = by_object(written, true)
            per_object.update(t)
            wrong_per_object.update(w)
            exact += not sum(w.values())
            if example is None:
                example = {"true": tokenizer.convert_tokens_to_string(true),
                           "written": tokenizer.convert_tokens_to_string(written)}
    out = {"split": split, "n_scenes": len(images), "tokens": sum(total.values()),
           "accuracy": 1 - sum(wrong.values()) / max(1, sum(total.values())), "exact_scenes": exact / len(images)}
    out.update({f"{k}_accuracy": 1 - wrong[k] / total[k] for k in KINDS if total[k]})
    out.update({f"object_{k}_accuracy": 1 - wrong_per_object[k] / per_object[k] for k in sorted(per_object)})
    wrong_numbers = max(1, wrong["number"])
    out.update({f"number_off_{d}": off[d] / wrong_numbers for d in NUMBER_ERRORS})
    out["example"] = example
    return out


def main(argv: list[str] | None = None) -> int:
    from qformer.bundle import load_bundle

    p = argparse.ArgumentParser(prog="python -m training.demo.written", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a demo bundle (trained with context distillation)")
    p.add_argument("--data", required=True, help="the shapes world it was trained on")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=200, help="scenes to read back")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps(written_context(load_bundle(args.model), args.data, args.split, args.n), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
