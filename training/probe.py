"""Linear probes on frozen vision features: which scene attributes can the bridge read at all?

    python -m training.probe --features BUILD/features/features.safetensors --scenes BUILD/data/scenes_train.json

A Q-Former can only pass on what the frozen vision tower encodes. For each attribute (the set of colours,
of shapes, of sizes in a scene) a linear multi-label classifier is fit on 80 % of the images from one
feature view (the first token, the mean of the others, all tokens flattened) and scored on the rest by
exact-set accuracy: every label of the image right. A figure near zero for an attribute means no bridge
trained on these features will name it reliably.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from training.shapes import COLOURS, SHAPES, SIZES

ATTRIBUTES = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}


def attribute_sets(scenes: list[dict], attribute: str) -> torch.Tensor:
    """(N, K) multi-hot: which values of `attribute` occur in each scene."""
    values = ATTRIBUTES[attribute]
    y = torch.zeros(len(scenes), len(values))
    for n, scene in enumerate(scenes):
        for obj in scene["objects"]:
            y[n, values.index(obj[attribute])] = 1
    return y


def probe(x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 1e-2, seed: int = 0) -> float:
    """Exact-set accuracy of a linear multi-label probe trained on the first 80 % of the rows."""
    torch.manual_seed(seed)
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    cut = int(0.8 * len(x))
    lin = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(lin(x[:cut]), y[:cut])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((lin(x[cut:]) > 0).float() == y[cut:]).all(1).float().mean().item()


def run(features: str, scenes_file: str, limit: int = 5000) -> dict[str, dict[str, float]]:
    cache = load_file(features)
    scenes = [s for s in json.loads(open(scenes_file, encoding="utf-8").read())["scenes"] if str(s["id"]) in cache]
    scenes = scenes[:limit]
    feats = torch.stack([cache[str(s["id"])].float() for s in scenes])  # (N, tokens, D)
    views = {"first_token": feats[:, 0], "mean_of_rest": feats[:, 1:].mean(1), "all_tokens": feats.flatten(1)}
    return {a: {v: round(probe(x, attribute_sets(scenes, a)), 3) for v, x in views.items()} for a in ATTRIBUTES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, help="a feature cache (features.safetensors, keyed by image id)")
    p.add_argument("--scenes", required=True, help="the shapes world's scenes_<split>.json for those images")
    p.add_argument("--limit", type=int, default=5000, help="at most this many images")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    print(json.dumps(run(args.features, args.scenes, args.limit), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
