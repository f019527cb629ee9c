"""Throughput and latency: transformers' `generate`, our decode loop, and the server, in one run.

    python -m service.bench --model qformer/demo/bundle --requests 48 --concurrency 1,4,16 --max-new-tokens 20
    python -m service.bench --url http://127.0.0.1:8000 --image photo.jpg --requests 64     # a running server only

With `--model` it measures, one after the other on the same bundle and image: in process, one caption
at a time (image processor + vision tower + Q-Former + decoding), with transformers' `generate` and with
our `Decoder` loop, then each on one batch of the largest concurrency; then the server
(`qbridge serve` on that bundle, started here for each of `--backends`, or `--url`) at each concurrency:
captions per second, p50 / p99 latency, non-200 answers; then, for each server when 1 is among the
concurrencies, one caption at a time through transformers, our loop and the server in turn (`paired`: the
rows named `paired with ...`); and the ratios the serving issue asks about, the one-client ones from those rounds.
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
from contextlib import contextmanager
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


HF_BATCH_1, OURS_BATCH_1 = "transformers generate, batch 1", "our decode loop, batch 1"
PAIRED = "paired with {}: "  # the name's prefix of the figures measured in turn with a server (`paired`)
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


class InProcess:
    """The bundle loaded here as `qbridge serve` loads it, captioning the image through transformers'
    `generate` or our loop (image processor + vision tower + Q-Former + decoding)."""

    def __init__(self, model: str, image: bytes, max_new_tokens: int):
        from PIL import Image

        from qformer.bundle import load_bundle
        from qformer.generation import GenerationConfig

        self.bundle = load_bundle(model)
        self.bridge = self.bundle.bridge.serving_layout()  # as `qbridge serve` loads it
        cfg = self.bridge.cfg
        self.prompt = cfg.prompts.caption_prompt()
        self.quality = cfg.num_quality_levels - 1 if cfg.num_quality_levels else None  # the caption route's default
        self.config = GenerationConfig(max_new_tokens=max_new_tokens)
        self.pil = Image.open(io.BytesIO(image)).convert("RGB")

    def caption(self, decode, n: int = 1):
        import torch

        with torch.no_grad():
            pixels = self.bundle.image_processor(images=[self.pil] * n, return_tensors="pt").pixel_values
            queries = self.bridge.project_queries(self.bridge.encode_images(pixels))
            quality = [self.quality] * n if self.quality is not None else None
            return decode(self.bridge, self.bundle.tokenizer, queries, [self.prompt] * n, quality, self.config)


def in_process(local: InProcess, requests: int, batch: int) -> list[Figures]:
    """transformers' `generate` and our loop, one caption at a time; then each on one batch of `batch` images
    (what a server at that many clients could at best do with the model's arithmetic, without HTTP)."""
    from qformer.generation import decode_from_queries, generate_from_queries

    rounds = max(1, requests // batch)
    return [_one_after_another(HF_BATCH_1, lambda: local.caption(generate_from_queries), requests, 1),
            _one_after_another(OURS_BATCH_1, lambda: local.caption(decode_from_queries), requests, 1),
            _one_after_another(f"transformers generate, one batch of {batch}",
                               lambda: local.caption(generate_from_queries, batch), rounds, batch),
            _one_after_another(f"our decode loop, one batch of {batch}",
                               lambda: local.caption(decode_from_queries, batch), rounds, batch)]


def _one_after_another(name: str, run, rounds: int, captions: int) -> Figures:
    """`run` (`captions` captions) once to warm up, then `rounds` times, each timed."""
    run()
    latencies = []
    start = time.perf_counter()
    for _ in range(rounds):
        t = time.perf_counter()
        run()
        latencies.append((time.perf_counter() - t) * 1000)
    return Figures(name, rounds * captions / (time.perf_counter() - start), latencies)


def paired(local: InProcess, post, requests: int, label: str) -> list[Figures]:
    """One caption at a time through transformers' `generate`, our loop and the server (`post`: one request),
    in turn, the order rotating each round: the three latencies of a round are measured within a second of
    each other, so their ratios do not carry this machine's drift over the minutes between the
    measurements above. Figures named `paired with LABEL: ...`; `ratios` takes their round-by-round ratios."""
    from qformer.generation import decode_from_queries, generate_from_queries

    runs = {HF_BATCH_1: lambda: local.caption(generate_from_queries),
            OURS_BATCH_1: lambda: local.caption(decode_from_queries),
            f"server {label}, 1 client": post}
    latencies: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for i in range(requests):
        for name in names[i % 3:] + names[: i % 3]:
            t = time.perf_counter()
            runs[name]()
            latencies[name].append((time.perf_counter() - t) * 1000)
    return [Figures(PAIRED.format(label) + name, 1000 * len(ms) / sum(ms), ms) for name, ms in latencies.items()]


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


def request_fields(args, base_url: str) -> tuple[str, dict, dict]:
    """The endpoint's URL, the form fields and the headers of the bench's requests."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    data = {"max_new_tokens": str(args.max_new_tokens)} if args.max_new_tokens else {}
    if args.endpoint == "vqa":
        data["question"] = args.question
    return base_url.rstrip("/") + "/v1/" + args.endpoint, data, headers


@contextmanager
def one_request(args, base_url: str, image: bytes, image_name: str):
    """A function that sends one request and fails unless it is answered 200 (for `paired`)."""
    import httpx

    url, data, headers = request_fields(args, base_url)
    with httpx.Client(headers=headers, timeout=args.timeout) as client:
        yield lambda: client.post(url, files={"file": (image_name, image)}, data=data).raise_for_status()


async def server_levels(args, base_url: str, image: bytes, image_name: str, label: str) -> list[Figures]:
    import httpx

    url, data, headers = request_fields(args, base_url)
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
    one-client latency against transformers and against our loop in process. Where `paired` measured a
    server, its one-client ratios are the medians of its rounds' ratios, and its transformers figure is the
    throughput's baseline; else the figures measured one after the other are compared."""
    by_name = {f.name: f for f in figures}
    hf, ours = by_name.get(HF_BATCH_1), by_name.get(OURS_BATCH_1)
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
    batched = next((f for f in figures if f.name.startswith("our decode loop, one batch of ")), None)
    for label in dict.fromkeys(f.name.split(",")[0] for f in servers):
        levels = [f for f in servers if f.name.startswith(label + ",")]
        one, most = levels[0], levels[-1]
        if batched:
            lines.append(f"{label}: {most.name.split(', ')[1]}: {most.per_s / batched.per_s:.2f}x the captions/s of "
                         f"{batched.name} in process")
        prefix = PAIRED.format(label.removeprefix("server "))
        server_1 = by_name.get(prefix + one.name)
        if server_1 is not None:
            hf_1, ours_1 = by_name[prefix + HF_BATCH_1], by_name[prefix + OURS_BATCH_1]
            n = len(server_1.latencies_ms)
            lines.append(f"{label}: {most.name.split(', ')[1]}: {most.per_s / hf_1.per_s:.2f}x the captions/s of "
                         f"transformers batch 1 (paired measurement's)")
            lines.append(f"{label}: 1 client, paired over {n} rounds: p50 {server_1.p50 / hf_1.p50:.2f}x "
                         f"transformers batch 1 (median of the rounds' ratios {_median_ratio(server_1, hf_1):.2f}x); "
                         f"p50 {server_1.p50 / ours_1.p50:.2f}x our loop in process: server overhead "
                         f"{100 * (server_1.p50 / ours_1.p50 - 1):+.0f} % (median of the rounds' ratios "
                         f"{100 * (_median_ratio(server_1, ours_1) - 1):+.0f} %)")
            continue
        if hf:
            lines.append(f"{label}: {most.name.split(', ')[1]}: {most.per_s / hf.per_s:.2f}x the captions/s of "
                         f"transformers batch 1; {one.name.split(', ')[1]}: p50 {one.p50 / hf.p50:.2f}x "
                         f"transformers batch 1")
        if ours:
            lines.append(f"{label}: {one.name.split(', ')[1]}: p50 {one.p50 / ours.p50:.2f}x our loop in process "
                         f"(server overhead {100 * (one.p50 / ours.p50 - 1):+.0f} %)")
    return lines


def _median_ratio(a: Figures, b: Figures) -> float:
    """The median of a's latencies over b's, round by round (figures from `paired`)."""
    return statistics.median(x / y for x, y in zip(a.latencies_ms, b.latencies_ms))


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
    local = None
    if args.model is not None and args.endpoint == "caption":
        local = InProcess(args.model, image, args.max_new_tokens)
        for f in in_process(local, args.requests, max(levels)):
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
            if local is not None and 1 in levels:
                with one_request(args, url, image, image_name) as post:
                    for f in paired(local, post, args.requests, label):
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
