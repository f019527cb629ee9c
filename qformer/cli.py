"""The `qbridge` command. Subcommands register under the `qbridge.commands` entry-point group, so this
module (in the model package) never imports `training` or `service`.

    qbridge --help
    qbridge caption --model BUNDLE IMAGE
    qbridge caption --url http://127.0.0.1:8000 IMAGE      # ask a running `qbridge serve`
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

GROUP = "qbridge.commands"

# Idle OpenMP threads spin by default; on a shared CPU (a laptop, CI, a server beside its clients) that
# spinning slowed torch steps down 5-7x in our measurements. Must be set before torch starts its threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _commands() -> dict:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _summary(ep) -> str:
    try:
        doc = (ep.load().__doc__ or "").strip()
    except Exception as exc:  # an optional extra may be missing; say so instead of failing the listing
        return f"(unavailable: {type(exc).__name__}: {exc})"
    return doc.splitlines()[0] if doc else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qbridge COMMAND [ARGS]   (qbridge COMMAND --help for a command's options)\n\ncommands:")
        for name in sorted(commands):
            print(f"  {name:<12} {_summary(commands[name])}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"qbridge: unknown command {name!r}; known: {', '.join(sorted(commands))}", file=sys.stderr)
        return 2
    result = commands[name].load()(rest)
    return int(result or 0)


def caption_main(argv: list[str] | None = None) -> int:
    """Caption an image in-process with a bundle (greedy), no server needed."""
    p = argparse.ArgumentParser(prog="qbridge caption", description=caption_main.__doc__)
    p.add_argument("image", help="image file (JPEG, PNG, WebP, GIF, BMP)")
    p.add_argument(
        "--model",
        default=os.environ.get("QBRIDGE_MODEL"),
        help="bundle directory (default: $QBRIDGE_MODEL, else the embedded demo model)",
    )
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--quality", default=None, help="quality level number or name (default: the highest)")
    p.add_argument(
        "--prompt", default=None, help="text the caption continues from (default: the bundle's caption prompt)"
    )
    p.add_argument(
        "--url",
        default=None,
        help="caption with a running server (POST URL/v1/caption) instead of loading the model here",
    )
    p.add_argument(
        "--api-key", default=os.environ.get("QBRIDGE_API_KEY"), help="with --url (default: $QBRIDGE_API_KEY)"
    )
    p.add_argument("--timeout", type=float, default=120.0, help="with --url: seconds to wait for the answer")
    args = p.parse_args(argv)
    if args.url:
        if args.prompt:
            p.error("--prompt is not supported with --url (the server writes the caption prompt)")
        return _caption_over_http(args)
    from PIL import Image, ImageOps

    from qformer import DEMO_BUNDLE
    from qformer.bundle import load_bundle
    from qformer.generation import GenerationConfig, generate

    if not args.model:
        if not (DEMO_BUNDLE / "qbridge.json").is_file():
            p.error(f"no model: pass --model BUNDLE or set QBRIDGE_MODEL (no demo bundle at {DEMO_BUNDLE})")
        args.model = str(DEMO_BUNDLE)

    try:
        with Image.open(args.image) as im:
            image = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, Image.DecompressionBombError) as exc:  # missing, unreadable or not an image
        p.error(f"cannot read {args.image}: {exc}")
    bundle = load_bundle(args.model)
    cfg = bundle.config
    quality = None
    if cfg.num_quality_levels:
        quality = [cfg.quality_level(args.quality) if args.quality is not None else cfg.num_quality_levels - 1]
    pixels = bundle.image_processor(images=[image], return_tensors="pt").pixel_values
    feats = bundle.bridge.encode_images(pixels)
    prompt = cfg.prompts.caption_prompt() if args.prompt is None else args.prompt
    (out,) = generate(
        bundle.bridge, bundle.tokenizer, feats, [prompt], quality, GenerationConfig(max_new_tokens=args.max_new_tokens)
    )
    print(out.text)
    return 0


def _caption_over_http(args) -> int:
    """POST the image to a running server's /v1/caption (standard library only: qformer never imports service)."""
    import json
    import urllib.error
    import urllib.request
    import uuid

    try:
        with open(args.image, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        print(f"{args.image}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    boundary = uuid.uuid4().hex
    fields = [("max_new_tokens", str(args.max_new_tokens))]
    if args.quality is not None:
        fields.append(("quality", str(args.quality)))
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode() + data + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        args.url.rstrip("/") + "/v1/caption",
        data=b"".join(parts),
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json"},
    )
    if args.api_key:
        request.add_header("Authorization", f"Bearer {args.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except Exception:
            message = exc.reason
        print(f"HTTP {exc.code}: {message}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"request to {args.url} failed: {exc}", file=sys.stderr)
        return 1
    print(body["caption"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
