"""The `qbridge` command. Subcommands register under the `qbridge.commands` entry-point group, so this
module (in the model package) never imports `training` or `service`.

    qbridge --help
    qbridge caption --model BUNDLE IMAGE
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import entry_points

GROUP = "qbridge.commands"


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
        help="bundle directory (default: $QBRIDGE_MODEL)",
    )
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--quality", default=None, help="quality level number or name (default: the highest)")
    p.add_argument("--prompt", default="", help="text the caption continues from")
    args = p.parse_args(argv)
    if not args.model:
        p.error("no model: pass --model BUNDLE or set QBRIDGE_MODEL")

    from PIL import Image, ImageOps

    from qformer.bundle import load_bundle
    from qformer.generation import GenerationConfig, generate

    bundle = load_bundle(args.model)
    cfg = bundle.config
    quality = None
    if cfg.num_quality_levels:
        quality = [cfg.quality_level(args.quality) if args.quality is not None else cfg.num_quality_levels - 1]
    with Image.open(args.image) as im:
        image = ImageOps.exif_transpose(im).convert("RGB")
    pixels = bundle.image_processor(images=[image], return_tensors="pt").pixel_values
    feats = bundle.bridge.encode_images(pixels)
    (out,) = generate(
        bundle.bridge, bundle.tokenizer, feats, [args.prompt], quality, GenerationConfig(max_new_tokens=args.max_new_tokens)
    )
    print(out.text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
