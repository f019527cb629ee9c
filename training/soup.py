"""Model soups (Wortsman et al., ICML 2022): average the trainable weights of bridges fine-tuned from one
initialisation (several stage-2 runs from one stage-1 run: seeds, learning rates).

    qbridge soup RUN_A/bundle RUN_B/bundle RUN_C/bundle --out soup/            # uniform soup
    qbridge soup RUN_* --out soup/ --greedy --data build/demo/data --n 200    # greedy soup on held-out data

Uniform: the mean of every ingredient's trainable tensors. Greedy (the paper's Recipe 1): ingredients are
ranked by their held-out score; the soup starts as the best and takes each next one only if the soup's
held-out score does not fall, so it never scores below its best ingredient on the data it was built on.
The score is the mean of the tasks the bundle serves (VQA accuracy, the top level's caption precision,
detection mAP@0.5) on ``--split`` of ``--data``. Ingredients whose frozen parts (vision tower, LLM), bridge
config or trainable shapes differ are refused with a message that says which: an average of unrelated
weights is noise. The soup is a bundle like any other, with ``soup.json`` beside it naming its ingredients.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from qformer.bundle import BundleError, load_bundle, load_trainable, save_bundle, weights_sha256
from qformer.config import ComponentRef


def _frozen_identity(bundle_dir: Path, ref: dict) -> str:
    """What a frozen component is: its sha256 when referenced, the hash of its embedded weights otherwise."""
    if ref["source"] == "embedded":
        return weights_sha256(bundle_dir / ref["path"])
    return ref.get("sha256") or ref["path"]


def check_ingredients(paths: Sequence[Path]) -> None:
    """Refuse bundles that are not fine-tunings of one model: frozen parts, config or tensor shapes differ."""
    if len(paths) < 2:
        raise BundleError("a soup needs at least two bundles")
    metas = [json.loads((p / "qbridge.json").read_text()) for p in paths if (p / "qbridge.json").is_file()]
    if len(metas) != len(paths):
        missing = [str(p) for p in paths if not (p / "qbridge.json").is_file()]
        raise BundleError(f"not qbridge bundles (no qbridge.json): {', '.join(missing)}")
    first, base = metas[0]["config"], paths[0]
    a = load_file(base / "model.safetensors")
    for path, meta in zip(paths[1:], metas[1:]):
        cfg = meta["config"]
        for part in ("vision", "llm"):
            if _frozen_identity(base, first[part]) != _frozen_identity(path, cfg[part]):
                raise BundleError(f"{path}'s frozen {part} differs from {base}'s: a soup averages bridges between "
                                  "the same frozen parts")
        diff = sorted(k for k in set(first) | set(cfg) if k not in ("vision", "llm") and first.get(k) != cfg.get(k))
        if diff:
            raise BundleError(f"{path}'s bridge config differs from {base}'s in {', '.join(diff)}")
        b = load_file(path / "model.safetensors")
        shapes = sorted(k for k in set(a) | set(b) if k not in a or k not in b or a[k].shape != b[k].shape)
        if shapes:
            raise BundleError(f"{path}'s trainable tensors differ from {base}'s in name or shape: {shapes[:5]}")
        moved = [k for k in a if k.startswith("alignment.") and not torch.equal(a[k], b[k])]
        if moved:
            raise BundleError(f"{path}'s frozen stage-1 copy differs from {base}'s ({moved[0]}, ...): ingredients "
                              "come from one stage-1 run")


def average(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of state dicts with the same keys (in fp32, returned in each tensor's dtype)."""
    return {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def bundle_score(bundle, data_dir: str | Path, split: str = "val", n: int | None = 200) -> float:
    """The mean of the served tasks' figures on ``split``: VQA accuracy, top-level caption precision, mAP@0.5."""
    from training.evaluate import evaluate_bundle

    res = evaluate_bundle(bundle, data_dir, split, n=n, progress=False)
    figures = []
    if res.get("vqa") and "accuracy" in res["vqa"]:
        figures.append(res["vqa"]["accuracy"])
    captions = res.get("captions") or {}
    if captions:
        top = captions[list(captions)[-1]]
        if top.get("precision") is not None:
            figures.append(top["precision"])
    if res.get("detection") and "map50" in res["detection"]:
        figures.append(res["detection"]["map50"])
    if not figures:
        raise BundleError(f"{data_dir} ({split}) gives this bundle nothing to be scored on")
    return sum(figures) / len(figures)


def make_soup(paths: Sequence[str | Path], out: str | Path, *, greedy: bool = False,
              score: Callable[[object], float] | None = None, log=print) -> dict:
    """Average ``paths``' trainable weights into a bundle at ``out``; returns what ``soup.json`` holds.

    ``score(bundle) -> float`` (higher is better) is required with ``greedy``."""
    paths = [Path(p) for p in paths]
    check_ingredients(paths)
    if greedy and score is None:
        raise ValueError("a greedy soup needs held-out data to score on (--data)")
    bundle = load_bundle(paths[0])
    states = {p: load_file(p / "model.safetensors") for p in paths}

    def scored(state: dict[str, torch.Tensor]) -> float:
        load_trainable(bundle.bridge, state, source="soup")
        return score(bundle)

    record: dict = {"ingredients": [str(p) for p in paths], "recipe": "greedy" if greedy else "uniform"}
    if greedy:
        singles = {p: scored(states[p]) for p in paths}
        ranked = sorted(paths, key=lambda p: -singles[p])
        kept, best = [ranked[0]], singles[ranked[0]]
        log(f"soup: {ranked[0]} scores {best:.4f} alone")
        for p in ranked[1:]:
            trial = scored(average([states[q] for q in kept + [p]]))
            verdict = "kept" if trial >= best else "left out"
            log(f"soup: + {p} -> {trial:.4f} ({verdict})")
            if trial >= best:
                kept, best = kept + [p], trial
        record.update({"scores": {str(p): singles[p] for p in paths}, "kept": [str(p) for p in kept],
                       "soup_score": best})
    else:
        kept = paths
        record["kept"] = [str(p) for p in kept]
    load_trainable(bundle.bridge, average([states[p] for p in kept]), source="soup")
    refs = {f"{part}_ref": ref for part, ref in (("vision", bundle.config.vision), ("llm", bundle.config.llm))
            if isinstance(ref, ComponentRef) and ref.source == "reference"}
    written = save_bundle(bundle.bridge, bundle.tokenizer, bundle.image_processor, out,
                          qformer_tokenizer=bundle.qformer_tokenizer, **refs)
    (written / "soup.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"soup: {len(kept)} of {len(paths)} ingredients -> {written}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Average fine-tuned bridges' weights into one bundle (a model soup: uniform or greedy)."""
    p = argparse.ArgumentParser(prog="qbridge soup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="+", help="bundle directories fine-tuned from one initialisation")
    p.add_argument("--out", required=True, help="where the soup's bundle is written")
    p.add_argument("--greedy", action="store_true", help="greedy soup: keep an ingredient only if the score holds")
    p.add_argument("--data", help="a dataset directory (shapes-world / COCO layout) to score on; needed by --greedy")
    p.add_argument("--split", default="val", help="the held-out split to score on (default: val)")
    p.add_argument("--n", type=int, default=200, help="images of the split to score on (default: 200)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.greedy and not args.data:
        p.error("--greedy needs --data (the held-out data the soup is built on)")
    score = (lambda b: bundle_score(b, args.data, args.split, args.n)) if args.data else None
    try:
        make_soup(args.bundles, args.out, greedy=args.greedy, score=score)
    except BundleError as exc:
        print(f"qbridge soup: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
