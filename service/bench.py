"""Throughput and latency of a running server at several client concurrencies (httpx, async).

    python -m service.bench --url http://127.0.0.1:8000 --image photo.jpg --requests 64 --concurrency 1,4,16

For each concurrency: captions per second and p50 / p99 latency of the successful requests, plus the
count of non-200 answers. Numbers depend on the machine, the model and --max-new-tokens: report them
with the command that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


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
            try:
                resp = await client.post(url, files={"file": (name, image)}, data=data)
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


async def main_async(args) -> int:
    import httpx

    image = Path(args.image).read_bytes()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    data = {"max_new_tokens": str(args.max_new_tokens)} if args.max_new_tokens else {}
    url = args.url.rstrip("/") + "/v1/" + args.endpoint
    if args.endpoint == "vqa":
        data["question"] = args.question
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout, limits=limits) as client:
        if args.warmup:
            await run_level(client, url, image, Path(args.image).name, data, args.warmup, 1)
        print(f"{args.endpoint} x {args.requests} requests at {url}")
        print(f"{'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'errors':>7}")
        for c in levels:
            wall, lat, failures = await run_level(client, url, image, Path(args.image).name, data, args.requests, c)
            ms = [x * 1000 for x in lat]
            errors = ", ".join(f"{k}:{v}" for k, v in sorted(failures.items())) or "0"
            mean = statistics.fmean(ms) if ms else float("nan")
            print(f"{c:>11} {len(lat) / wall:>8.2f} {percentile(ms, 0.5):>8.1f} {percentile(ms, 0.99):>8.1f} "
                  f"{mean:>8.1f} {errors:>7}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("QBRIDGE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--image", required=True)
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client concurrencies")
    p.add_argument("--endpoint", default="caption", choices=("caption", "vqa", "detect"))
    p.add_argument("--question", default="what is in the image?", help="for --endpoint vqa")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2, help="requests sent before measuring")
    p.add_argument("--api-key", default=os.environ.get("QBRIDGE_API_KEY"))
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.requests < 1:
        p.error("--requests must be >= 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
