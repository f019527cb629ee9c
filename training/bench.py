"""Stage-1 throughput with and without the on-disk cache of frozen vision features.

    python -m training.bench --config training/configs/demo_stage1.json --steps 30 [section.field=value ...]

Runs the same stage-1 steps twice from scratch, encoding images every step and then reading cached
features, and prints samples/s for each (the cache build is timed separately) and their ratio.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from training.config import load_config
from training.train import train


def _rate(out: Path, skip: int) -> float:
    """Median samples/s over the logged intervals after the first `skip` (warm-up) entries."""
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    rates = []
    for a, b in zip(rows, rows[1:]):
        if b["step"] > skip:
            rates.append((b["samples_since_start"] - a["samples_since_start"]) / (b["seconds"] - a["seconds"]))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="qbridge-bench-"))
    try:
        results = {}
        for name, cache in (("no cache", ""), ("feature cache", str(work / "cache"))):
            if cache:  # build the cache outside the timed run
                t = time.time()
                cfg = load_config(args.config, [*args.overrides, f"run.out_dir={work / 'warm'}", "run.steps=1",
                                                f"run.feature_cache={cache}", "run.save_every=1000000"])
                train(cfg, progress=False)
                results["cache build seconds"] = time.time() - t
            out = work / name.replace(" ", "-")
            cfg = load_config(args.config, [*args.overrides, f"run.out_dir={out}", f"run.steps={args.steps}",
                                            f"run.feature_cache={cache}", "run.log_every=1", "run.save_every=1000000"])
            train(cfg, progress=False)
            results[name] = _rate(out, skip=min(5, args.steps // 3))
        print(f"stage-1 samples/s, no cache:      {results['no cache']:.1f}")
        print(f"stage-1 samples/s, feature cache: {results['feature cache']:.1f}")
        print(f"speed-up: {results['feature cache'] / results['no cache']:.2f}x "
              f"(cache built once in {results['cache build seconds']:.1f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
