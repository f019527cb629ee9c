"""Throughput and latency: transformers' `generate`, our decode loop, and the server, in one run.

    python -m service.bench --model qformer/demo/bundle --requests 48 --concurrency 1,4,16 --max-new-tokens 20
    python -m service.bench --url http://127.0.0.1:8000 --image photo.jpg --requests 64     # a running server only

With `--model` it measures, one after the other on the same bundle and image: in process, one caption
at a time (image processor + vision tower + Q-Former + decoding), with transformers' `generate` and with
our `Decoder` loop, plus transformers' `generate` on one batch of the largest concurrency; then the server
(`qbridge serve` on that bundle, started here for each of `--backends`, or `--url`) at each concurrency:
captions per second, p50 / p99 latency, non-200 answers; and the ratios the serving issue asks about.
Numbers depend on the machine, the model and --max-new-tokens: report them with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Figures:
    name: str
    per_s: float  # captions per second
    latencies_ms: list[float]
    errors: str = "0"

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 0.5)

    def row(self) -> str:
        ms = self.latencies_ms
        mean = statistics.fmean(ms) if ms else float("nan")
        return (f"{self.name:<44} {self.per_s:>10.2f} {self.p50:>8.1f} {percentile(ms, 0.99):>8.1f} {mean:>8.1f} "
                f"{self.errors:>7}")


HEADER = f"{'what':<44} {'captions/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'errors':>7}"


def default_image_bytes() -> bytes:
    """A shapes-world-like picture (a red circle and a blue square on grey), when no --image is given."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (128, 128), (200, 200, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((16, 20, 56, 60), fill=(220, 30, 30))
    draw.rectangle((70, 64, 112, 106), fill=(30, 60, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# --- in process ------------------------------------------------------------------------------------


def in_process(model: str, image: bytes, requests: int, max_new_tokens: int, batch: int) -> list[Figures]:
    """transformers' `generate` and our loop, one caption at a time; then transformers on one batch."""
    import torch
    from PIL import Image

    from qformer.bundle import load_bundle
    from qformer.generation import GenerationConfig, decode_from_queries, generate_from_queries

    bundle = load_bundle(model)
    bridge, tokenizer = bundle.bridge.serving_layout(), bundle.tokenizer  # as `qbridge serve` loads it
    cfg = bridge.cfg
    prompt = cfg.prompts.caption_prompt()
    quality = cfg.num_quality_levels - 1 if cfg.num_quality_levels else None  # the caption route's default
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    pil = Image.open(io.BytesIO(image)).convert("RGB")

    @torch.no_grad()
    def caption(decode, n: int):
        pixels = bundle.image_processor(images=[pil] * n, return_tensors="pt").pixel_values
        queries = bridge.project_queries(bridge.encode_images(pixels))
        return decode(bridge, tokenizer, queries, [prompt] * n, [quality] * n if quality is not None else None,
                      config)

    figures = []
    for name, decode in (("transformers generate, batch 1", generate_from_queries),
                         ("our decode loop, batch 1", decode_from_queries)):
        caption(decode, 1)  # warm-up
        latencies = []
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            caption(decode, 1)
            latencies.append((time.perf_counter() - t) * 1000)
        figures.append(Figures(name, requests / (time.perf_counter() - start), latencies))
    caption(generate_from_queries, batch)
    rounds = max(1, requests // batch)
    latencies = []
    start = time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        caption(generate_from_queries, batch)
        latencies.append((time.perf_counter() - t) * 1000)
    per_s = rounds * batch / (time.perf_counter() - start)
    figures.append(Figures(f"transformers generate, one batch of {batch}", per_s, latencies))
    return figures


# --- a server --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, max_batch: int, threads: int, timeout: float = 300) -> tuple:
    """`qbridge serve` on a free port; (process, url) once /health/ready answers 200."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "qformer.cli", "serve", "--model", model, "--port", str(port), "--backend", backend,
           "--max-batch-size", str(max_batch), "--queue-size", str(max(64, 4 * max_batch)),
           "--log-level", "warning"]
    if threads:
        cmd += ["--torch-threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {backend} server exited with {proc.returncode}: "
                               f"{proc.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(proc)
    raise RuntimeError(f"the {backend} server was not ready after {timeout:g} s")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_level(client, url: str, image: bytes, name: str, data: dict, requests: int, concurrency: int):
    latencies: list[float] = []
    failures: dict[int, int] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker():
        while True:
            try:
                queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:  # image None: `data` names an uploaded image by image_id
                files = {"file": (name, image)} if image is not None else None
                resp = await client.post(url, files=files, data=data)
                status = resp.status_code
            except Exception:
                status = -1
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                failures[status] = failures.get(status, 0) + 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, failures


async def server_levels(args, base_url: str, image: bytes, image_name: str, label: str) -> list[Figures]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    data = {"max_new_tokens": str(args.max_new_tokens)} if args.max_new_tokens else {}
    url = base_url.rstrip("/") + "/v1/" + args.endpoint
    if args.endpoint == "vqa":
        data["question"] = args.question
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    figures = []
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as client:
        if args.warmup:
            await run_level(client, url, image, image_name, data, args.warmup, 1)
        async def measure(kind: str, image_bytes: bytes | None, fields: dict) -> None:
            for c in levels:
                wall, lat, failures = await run_level(client, url, image_bytes, image_name, fields, args.requests, c)
                errors = ", ".join(f"{k}:{v}" for k, v in sorted(failures.items())) or "0"
                figures.append(Figures(f"{kind} {label}, {c} client{'s' if c > 1 else ''}", len(lat) / wall,
                                       [x * 1000 for x in lat], errors))

        await measure("server", image, data)
        if args.cached:  # the same requests about an image encoded once, named by image_id
            resp = await client.post(base_url.rstrip("/") + "/v1/images", files={"file": (image_name, image)})
            resp.raise_for_status()
            await measure("cached", None, {**data, "image_id": resp.json()["image_id"]})
    return figures


def ratios(figures: list[Figures]) -> list[str]:
    """The serving issue's measures: throughput at the most clients over transformers batch 1, and the
    one-client latency against transformers and against our loop in process."""
    by_name = {f.name: f for f in figures}
    hf, ours = by_name.get("transformers generate, batch 1"), by_name.get("our decode loop, batch 1")
    lines = []
    if hf and ours:
        lines.append(f"our loop in process: {ours.per_s / hf.per_s:.2f}x the captions/s of transformers batch 1, "
                     f"p50 {ours.p50 / hf.p50:.2f}x")
    for f in figures:
        if f.name.startswith("cached "):
            upload = next((u for u in figures if u.name == "server " + f.name[len("cached "):]), None)
            if upload:
                lines.append(f"{f.name}: by image_id p50 {f.p50:.0f} ms against {upload.p50:.0f} ms uploading the "
                             f"image: {upload.p50 / f.p50:.2f}x faster")
    servers = [f for f in figures if f.name.startswith("server")]
    for label in dict.fromkeys(f.name.split(",")[0] for f in servers):
        levels = [f for f in servers if f.name.startswith(label + ",")]
        one, most = levels[0], levels[-1]
        if hf:
            lines.append(f"{label}: {most.name.split(', ')[1]}: {most.per_s / hf.per_s:.2f}x the captions/s of "
                         f"transformers batch 1; {one.name.split(', ')[1]}: p50 {one.p50 / hf.p50:.2f}x "
                         f"transformers batch 1")
        if ours:
            lines.append(f"{label}: {one.name.split(', ')[1]}: p50 {one.p50 / ours.p50:.2f}x our loop in process "
                         f"(server overhead {100 * (one.p50 / ours.p50 - 1):+.0f} %)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a bundle: measure in process too, and start servers on it")
    p.add_argument("--url", default=os.environ.get("QBRIDGE_URL"), help="a running server (instead of starting one)")
    p.add_argument("--backends", default="torch", help="with --model: comma-separated backends to serve (torch,vllm)")
    p.add_argument("--image", default=None, help="image file (default: a drawn test picture)")
    p.add_argument("--requests", type=int, default=32, help="requests per measurement")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    p.add_argument("--endpoint", default="caption", choices=("caption", "vqa", "detect"))
    p.add_argument("--question", default="what is in the image?", help="for --endpoint vqa")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--threads", type=int, default=0, help="torch threads in process, and in started servers unless "
                   "--server-threads (0: torch's default)")
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads of started servers (default: --threads, or the server's own default)")
    p.add_argument("--api-key", default=os.environ.get("QBRIDGE_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--cached", action="store_true",
                   help="also ask about the image uploaded once (POST /v1/images) by image_id, and print the speed-up")
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be >= 1")
    if args.model is None and args.url is None:
        p.error("give --model (a bundle) or --url (a running server)")
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1:
        p.error("--concurrency needs positive integers")
    image = Path(args.image).read_bytes() if args.image else default_image_bytes()
    image_name = Path(args.image).name if args.image else "bench.png"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    figures: list[Figures] = []
    print(f"{args.endpoint}, {args.requests} requests per line, max_new_tokens {args.max_new_tokens}")
    print(HEADER)
    if args.model is not None and args.endpoint == "caption":
        for f in in_process(args.model, image, args.requests, args.max_new_tokens, max(levels)):
            print(f.row(), flush=True)
            figures.append(f)
    if args.url is not None:
        servers = [(args.url, None, "at " + args.url)]
    else:
        servers = [(None, b, b) for b in args.backends.split(",") if b.strip()]
    for url, backend, label in servers:
        proc = None
        if url is None:
            threads = args.threads if args.server_threads is None else args.server_threads
            proc, url = start_server(args.model, backend, max(levels), threads)
        try:
            for f in asyncio.run(server_levels(args, url, image, image_name, label)):
                print(f.row(), flush=True)
                figures.append(f)
        finally:
            if proc is not None:
                stop_server(proc)
    for line in ratios(figures):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
