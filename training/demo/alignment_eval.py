"""What the demo bundle's Q-Former heads answer through the service's alignment endpoints, on single-object
scenes: zero-shot shape and colour classification from ``POST /v1/classify`` (one template, an ensemble of
templates, and an ensemble over the world's other attribute, by averaged features and by best template), and
``POST /v1/match`` preferring a scene's true caption to one with one attribute edited (colour, shape or size,
in turn).

    python -m training.demo.alignment_eval --model qformer/demo/bundle --n 1000 [--seed 0] [--out figures.json]
    python -m training.demo.alignment_eval --url http://127.0.0.1:8000 --n 1000     # a running server

The requests go over HTTP to `qbridge serve` (started here on a free port unless ``--url`` names one); each image is uploaded once (``POST /v1/images``) and asked about by ``image_id``. Scenes are test-split
scenes of ``--seed`` with ``max_objects=1``; a seed no test uses gives fresh scenes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tqdm import tqdm

from training.demo.shapes import COLOURS, SHAPES, SIZES, Scene, caption, make_scene, render

# The first template of each is the single-template figure; all of them are the ensemble.
TEMPLATES = {
    "shape": ("a photo of a {}.", "there is one shape: a {}.", "a {} on a background.", "one {}."),
    "colour": ("a photo of a {} shape.", "there is one {} shape.", "a {} object on a background.", "one {} shape."),
}
LABELS = {"shape": list(SHAPES), "colour": list(COLOURS)}
# An ensemble over the world's other attribute, in the short captions' own words ("a black triangle"): a shape's
# text features averaged over every colour, a colour's over every shape, so no single template's other word
# decides (CLIP's ensembling, with the templates drawn from what the labels are seen beside).
WORLD_TEMPLATES = {
    "shape": tuple(f"a {c} {{}}" for c in COLOURS),
    "colour": tuple(f"a {{}} {s}" for s in SHAPES),
}


def classify_kinds(task: str) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """(figure name, templates, ensemble) of each classification figure."""
    return (("single", TEMPLATES[task][:1], "mean"), ("ensemble", TEMPLATES[task], "mean"),
            ("world", WORLD_TEMPLATES[task], "mean"), ("world_max", WORLD_TEMPLATES[task], "max"))


def edited_caption(scene: Scene, attribute: str) -> str:
    """The scene's ``normal`` caption with the object's ``attribute`` swapped for the next value of its kind."""
    (obj,) = scene.objects
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES)}[attribute]
    new = values[(values.index(getattr(obj, attribute)) + 1) % len(values)]
    return caption(dataclasses.replace(scene, objects=(dataclasses.replace(obj, **{attribute: new}),)), "normal")


class _Client:
    """A JSON client of the standard library: the evaluation talks to the service over HTTP only."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read() or b"{}")


@contextlib.contextmanager
def _server(model: str):
    """`qbridge serve --model MODEL` on a free port, until it reports ready; stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "--model", model, "--port", str(port),
                             "--no-warmup"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"`qbridge serve --model {model}` exited with {proc.returncode}")
            try:
                urllib.request.urlopen(url + "/health/ready", timeout=5)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"{model} was not ready within 10 minutes") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def evaluate(url: str, n: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """The figures of the server at ``url`` on ``n`` single-object test scenes of ``seed``."""
    client = _Client(url)
    hits = {f"{task}_{kind}": 0 for task in TEMPLATES for kind, _, _ in classify_kinds(task)}
    match_itm = match_itc = 0
    for i in tqdm(range(n), desc="alignment eval", unit="scene", disable=not progress):
        scene = make_scene(seed, "test", i, max_objects=1)
        buf = io.BytesIO()
        render(scene).save(buf, format="PNG")
        image_id = client.call("POST", "/v1/images", {"image": base64.b64encode(buf.getvalue()).decode()})["image_id"]
        (obj,) = scene.objects
        for task, templates in TEMPLATES.items():
            for kind, used, ensemble in classify_kinds(task):
                r = client.call("POST", "/v1/classify", {"image_id": image_id, "labels": LABELS[task],
                                                          "templates": list(used), "ensemble": ensemble})
                hits[f"{task}_{kind}"] += r["labels"][0]["label"] == getattr(obj, task)
        attribute = ("colour", "shape", "size")[i % 3]
        texts = [caption(scene, "normal"), edited_caption(scene, attribute)]
        true, edited = client.call("POST", "/v1/match", {"image_id": image_id, "texts": texts})["matches"]
        match_itm += true["itm_probability"] > edited["itm_probability"]
        match_itc += true["itc_similarity"] > edited["itc_similarity"]
        client.call("DELETE", f"/v1/images/{image_id}")
    figures = {f"classify_{k}_top1": v / n for k, v in hits.items()}
    figures.update({"match_true_over_edited_itm": match_itm / n, "match_true_over_edited_itc": match_itc / n,
                    "n_scenes": n, "seed": seed, "chance_shape": 1 / len(SHAPES), "chance_colour": 1 / len(COLOURS),
                    "templates": {k: list(v) for k, v in TEMPLATES.items()},
                    "world_templates": {k: list(v) for k, v in WORLD_TEMPLATES.items()}})
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.demo.alignment_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qformer/demo/bundle", help="the bundle to serve (default: the demo's)")
    p.add_argument("--url", help="a running server to ask instead (then --model is not used)")
    p.add_argument("--n", type=int, default=1000, help="single-object test scenes (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="the world's seed for the scenes (default: 0)")
    p.add_argument("--out", help="also write the figures to this JSON file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.url:
        figures = evaluate(args.url, args.n, args.seed)
    else:
        with _server(args.model) as url:
            figures = evaluate(url, args.n, args.seed)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
