"""How the demo does on backgrounds its world never draws: the same scenes, repainted on plain fills.

    python -m training.demo.backgrounds --model qformer/demo/bundle --data DATA --split test --n 300

The shapes world draws seven mid-tone backgrounds (grey 128, beige, slate, gradient, striped, checkered,
noisy). A first user draws a red circle on white, or on light grey. This repaints each scene of a split
on each plain fill (same shapes, same boxes, same questions), leaves out the scenes that hold an object
of nearly the fill's colour (a white circle on white is not there to see), and scores the bundle on
every version with `qbridge eval`'s own code (top caption level): VQA accuracy, top-level caption
precision / recall and mAP@0.5. The `world` row is the split as written, on the same scenes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from training.demo.shapes import Scene, render, visible_on

# name -> RGB fill; "world" keeps the images as the world drew them
FILLS = {
    "world": None,
    "white": (255, 255, 255),
    "light grey": (200, 200, 200),
    "mid grey": (160, 160, 160),
    "dark grey": (64, 64, 64),
    "black": (0, 0, 0),
}


def write_variant(data: Path, split: str, scenes: list[Scene], fill, out: Path) -> list[Scene]:
    """A data directory at `out` whose `split` holds `scenes` repainted on `fill` (the annotations are the
    originals'; `load_split` keeps those of the images listed). Returns the scenes kept."""
    kept = [s for s in scenes if fill is None or visible_on(s, fill)]
    ids = {s.id for s in kept}
    (out / "images" / split).mkdir(parents=True, exist_ok=True)
    captions = json.loads((data / f"captions_{split}.json").read_text())
    captions["images"] = [im for im in captions["images"] if im["id"] in ids]
    (out / f"captions_{split}.json").write_text(json.dumps(captions))
    for name in ("questions", "annotations_vqa", "instances", "scenes"):
        shutil.copy(data / f"{name}_{split}.json", out / f"{name}_{split}.json")
    file_of = {im["id"]: im["file_name"] for im in captions["images"]}
    for s in kept:
        target = out / "images" / split / file_of[s.id]
        if fill is None:
            shutil.copy(data / "images" / split / file_of[s.id], target)
        else:
            render(s, fill).save(target)
    return kept


def score_backgrounds(bundle, data: str | Path, split: str = "test", n: int = 300,
                      work: str | Path = "build/backgrounds", fills: list[str] | None = None,
                      progress: bool = False) -> dict:
    """The first `n` scenes of `split` repainted on each of `fills` (default all of :data:`FILLS`) under `work`,
    and `bundle`'s figures on each (its top caption level): fill name -> scenes kept, VQA accuracy, caption
    precision / recall, mAP@0.5, an example caption."""
    from training.evaluate import evaluate_bundle

    data = Path(data)
    scenes = sorted((Scene.from_dict(s) for s in json.loads((data / f"scenes_{split}.json").read_text())["scenes"]),
                    key=lambda s: s.id)[:n]
    rows = {}
    for name in fills or list(FILLS):
        out = Path(work) / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        kept = write_variant(data, split, scenes, FILLS[name], out)
        r = evaluate_bundle(bundle, out, split, levels=["best"] if bundle.config.num_quality_levels else None,
                            progress=progress)
        top = list(r["captions"].values())[-1]
        rows[name] = {"scenes": len(kept), "vqa": r["vqa"].get("accuracy"), "caption_precision": top.get("precision"),
                      "caption_recall": top.get("recall"), "map50": r["detection"].get("map50"),
                      "example": next(iter(top["examples"].values()), "")}
    return rows


def markdown(rows: dict) -> list[str]:
    """A report table of :func:`score_backgrounds`."""
    lines = ["| background | scenes | VQA | caption precision / recall | mAP@0.5 |", "|---|---:|---:|---:|---:|"]
    for name, f in rows.items():
        label = "as the world draws it" if FILLS.get(name) is None else f"{name} {FILLS[name]}"
        lines.append(f"| {label} | {f['scenes']} | {f['vqa']:.3f} | {f['caption_precision']:.3f} / "
                     f"{f['caption_recall']:.3f} | {f['map50']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo.backgrounds", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qformer/demo/bundle", help="bundle directory")
    p.add_argument("--data", required=True, help="a shapes-world data directory (qbridge data shapes)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=300, help="first N scenes of the split")
    p.add_argument("--work", default="build/backgrounds", help="where the repainted copies are written")
    p.add_argument("--fills", default=",".join(FILLS), help="comma-separated names of " + ", ".join(FILLS))
    p.add_argument("--out", help="write the figures here as JSON")
    args = p.parse_args(argv)

    from qformer.bundle import load_bundle

    fills = [f.strip() for f in args.fills.split(",") if f.strip()]
    unknown = [f for f in fills if f not in FILLS]
    if unknown:
        p.error(f"unknown fills {unknown}; known: {', '.join(FILLS)}")
    rows = score_backgrounds(load_bundle(args.model), args.data, args.split, args.n, args.work, fills, progress=True)
    print("\n".join(markdown(rows)))
    for name, f in rows.items():
        print(f"{name}: {f['example']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
