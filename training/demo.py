"""Build the embedded demo model from nothing, on a CPU, with this project's own pipeline.

    qbridge demo build --out build/demo [--install]      (also: make demo)

Steps: shapes-world data -> tokenizer -> frozen LLM pretraining -> frozen vision pretraining -> stage 1
-> quality scoring -> stage 2 -> evaluation (report) -> noise-robustness ablation. `--install` copies the
bundle and its report to `qformer/demo/`, the default model of `make serve` and `qbridge caption`.
Each step writes into OUT and is skipped when its output already exists, so an interrupted build resumes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from qformer import DEMO_BUNDLE
from training.config import CONFIG_DIR, load_config

DEMO_DIR = DEMO_BUNDLE.parent
MAX_BUNDLE_MB = 40
# The golden test (tests/test_golden.py): the first GOLDEN_SCENES test scenes of seed 0, each figure
# asserted at the value measured at install time minus GOLDEN_MARGIN.
GOLDEN_SCENES = 200
GOLDEN_MARGIN = 0.02


@dataclass
class Plan:
    """Sizes of a build; `--quick` shrinks every step into a smoke run."""

    n_train: int = 5000
    n_test: int = 1000
    n_heldout: int = 300
    image_size: int = 128  # the vision encoder's input
    data_size: int = 224  # rendered scenes (the vision pretraining renders at 224 and resizes too)
    llm_steps: int = 1500
    vision_steps: int = 400
    stage1_steps: int = 800
    stage2_steps: int = 3000
    ablation_steps: int = 300
    eval_n: int | None = None  # all test images
    seed: int = 0
    noise: float = 0.3
    overrides: list = field(default_factory=list)
    quick: bool = False  # tiny model sizes too


QUICK = Plan(n_train=64, n_test=8, n_heldout=4, image_size=64, data_size=64, llm_steps=10, vision_steps=10, stage1_steps=10,
             stage2_steps=12, ablation_steps=4, eval_n=8, quick=True)


class Steps:
    """Prints each step with the elapsed time and a running ETA from the planned step weights."""

    def __init__(self, weights: dict[str, float], log: Path | None = None):
        self.weights, self.done, self.t0 = weights, 0.0, time.time()
        self.log = log  # JSON {step: seconds} of the steps run here (a resumed build keeps earlier entries)

    def run(self, name: str, marker: Path, fn) -> None:
        total = sum(self.weights.values())
        elapsed = time.time() - self.t0
        eta = elapsed / self.done * (total - self.done) if self.done else float("nan")
        eta_txt = f", ETA {eta / 60:.0f} min" if self.done else ""
        print(f"\n=== {name} (elapsed {elapsed / 60:.1f} min{eta_txt}) ===", flush=True)
        if marker.exists():
            print(f"    already done: {marker}")
        else:
            t = time.time()
            fn()
            print(f"    {name}: {time.time() - t:.0f} s", flush=True)
            if self.log is not None:
                seconds = json.loads(self.log.read_text()) if self.log.exists() else {}
                seconds[name] = round(time.time() - t, 1)
                self.log.write_text(json.dumps(seconds, indent=2))
        self.done += self.weights[name]


def build(out: Path, plan: Plan, progress: bool = True) -> Path:
    from training import pretrain, shapes
    from training.evaluate import evaluate_bundle
    from training.quality import score_and_bin
    from training.train import train

    out.mkdir(parents=True, exist_ok=True)
    data, llm, vision = out / "data", out / "llm", out / "vision"
    # Minutes each step took on 2 idle CPU cores (the ETA's weights).
    steps = Steps({"data": 0.6, "tokenizer": 0.02, "llm": 7.5, "vision": 5, "stage 1": 8.5, "quality": 2,
                   "stage 2": 13, "evaluation": 3, "ablation": 7}, out / "timings.json")
    paths = [f"model.vision={vision}", f"model.llm={llm}", f"data.root={data}"]

    steps.run("data", data / "world.json", lambda: shapes.write_dataset(
        data, n=plan.n_train, seed=plan.seed, noise=plan.noise, n_val=max(1, plan.n_test // 5), n_test=plan.n_test,
        n_heldout=plan.n_heldout, size=(plan.data_size, plan.data_size), progress=progress))
    steps.run("tokenizer", llm / "tokenizer.json", lambda: pretrain.train_tokenizer(None, llm, seed=plan.seed))
    steps.run("llm", llm / "model.safetensors", lambda: pretrain.pretrain_llm(
        None, llm, llm, plan.llm_steps, seed=plan.seed, progress=progress,
        **(pretrain.TINY_LLM if plan.quick else {})))
    steps.run("vision", vision / "model.safetensors", lambda: pretrain.pretrain_vision(
        vision, plan.vision_steps, tokenizer=llm, seed=plan.seed, image_size=plan.image_size, progress=progress,
        **({k: v for k, v in pretrain.TINY_VISION.items() if k != "image_size"} if plan.quick else {})))

    cache = out / "features"
    s1 = load_config(CONFIG_DIR / "demo_stage1.json", [*paths, f"run.out_dir={out / 'stage1'}",
                                                        f"run.steps={plan.stage1_steps}", f"run.feature_cache={cache}",
                                                        *plan.overrides])
    steps.run("stage 1", out / "stage1" / "final" / "stage1.safetensors", lambda: train(s1, progress=progress))
    quality_file = data / "captions_train_quality.json"
    levels = load_config(CONFIG_DIR / "demo_stage2.json").model.num_quality_levels
    steps.run("quality", quality_file, lambda: score_and_bin(s1, str(out / "stage1"), levels, str(quality_file)))

    def stage2(name: str, steps_: int, extra: list[str]):
        cfg = load_config(CONFIG_DIR / "demo_stage2.json", [
            *paths, f"model.init_from={out / 'stage1'}", f"run.out_dir={out / name}", f"run.steps={steps_}",
            f"run.feature_cache={cache}", *extra, *plan.overrides])
        train(cfg, progress=progress)

    steps.run("stage 2", out / "stage2" / "bundle" / "qbridge.json", lambda: stage2("stage2", plan.stage2_steps, []))
    bundle_dir = out / "stage2" / "bundle"
    report_json = out / "report.json"

    def evaluate():
        from qformer.bundle import load_bundle

        bundle = load_bundle(bundle_dir)
        results = {"test": evaluate_bundle(bundle, data, "test", plan.eval_n, progress=progress),
                   "heldout": evaluate_bundle(bundle, data, "heldout", plan.eval_n, progress=progress)}
        report_json.write_text(json.dumps(results, indent=2))  # keeps the level order

    steps.run("evaluation", report_json, evaluate)
    ablation_json = out / "ablation.json"
    steps.run("ablation", ablation_json, lambda: ablation(out, plan, paths, cache, ablation_json, progress))
    write_report(out, plan)
    return bundle_dir


def ablation(out: Path, plan: Plan, paths: list[str], cache: Path, target: Path, progress: bool) -> None:
    """NoC-style noise robustness: the same noisy captions, captioning only, trained three ways.

    (a) no quality conditioning, (b) pairs filtered to the best-aligned quarter, (c) quality-conditioned,
    decoded at the top level. Caption precision, recall and CIDEr on the clean test split.
    """
    from qformer.bundle import load_bundle
    from training.evaluate import evaluate_bundle
    from training.train import train

    data = out / "data"
    full = json.loads((data / "captions_train_quality.json").read_text())
    top = max(a["quality"] for a in full["annotations"])
    filtered = dict(full, annotations=[a for a in full["annotations"] if a["quality"] == top])
    (data / "captions_train_filtered.json").write_text(json.dumps(filtered))
    variants = {
        "a_no_conditioning": ["model.num_quality_levels=0", "data.captions=captions_{split}_quality.json"],
        "b_filtered": ["model.num_quality_levels=0", "data.captions=captions_{split}_filtered.json"],
        "c_quality_top": [],
    }
    results = {}
    for name, extra in variants.items():
        run = out / "ablation" / name
        cfg = load_config(CONFIG_DIR / "demo_stage2.json", [
            *paths, f"model.init_from={out / 'stage1'}", f"run.out_dir={run}", f"run.steps={plan.ablation_steps}",
            f"run.feature_cache={cache}", 'data.tasks={"caption": 1.0}', "model.num_loc_bins=0", *extra,
            *plan.overrides])
        if not (run / "bundle" / "qbridge.json").exists():
            train(cfg, progress=progress)
        bundle = load_bundle(run / "bundle")
        levels = [bundle.config.num_quality_levels - 1] if bundle.config.num_quality_levels else None
        res = evaluate_bundle(bundle, data, "test", plan.eval_n, levels=levels, progress=progress)
        (caption,) = res["captions"].values()
        results[name] = {k: caption[k] for k in ("precision", "recall", "cider", "bleu4")}
    target.write_text(json.dumps(results, indent=2, sort_keys=True))


def write_report(out: Path, plan: Plan) -> None:
    from training.evaluate import report_markdown
    from training.probe import run as probe

    results = json.loads((out / "report.json").read_text())
    ablation = json.loads((out / "ablation.json").read_text())
    frozen = {part: json.loads((out / part / "pretrain.json").read_text())["metrics"]["val"]
              for part in ("llm", "vision")}
    probes = probe(str(out / "features" / "features.safetensors"), str(out / "data" / "scenes_train.json"))
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    lines = ["# Demo model report", "",
             f"Built by `qbridge demo build` (seed {plan.seed}, {plan.n_train} training scenes with "
             f"{plan.noise:.0%} noisy captions). Figures on the clean test split ({results['test']['n_images']} "
             f"scenes) and the held-out colour-shape split ({results['heldout']['n_images']} scenes); "
             "reproduce with `qbridge eval --model qformer/demo/bundle --data DATA --split test`.", "",
             "## Test split", "", report_markdown(results["test"]), "",
             "## Held-out colour-shape split", "", report_markdown(results["heldout"]), "",
             "## Noise robustness (captioning only, same noisy data, three ways)", "",
             "| variant | precision | recall | CIDEr | BLEU-4 |", "|---|---|---|---|---|"]
    for name, r in ablation.items():
        lines.append(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['cider']:.3f} | {r['bleu4']:.3f} |")
    lines += ["", "## The frozen parts", "",
              "What the bridge can pass on is bounded by them. LLM: per-token loss on clean val documents read "
              "after their own scene description (`context_*`) and after another scene's (`wrong_context_*`); "
              "a gap means the LLM takes that task's answer from what precedes `<s>`, where the queries go.", "",
              "| task | own context | another scene's |", "|---|---:|---:|"]
    llm = frozen["llm"]
    for task in sorted(k[len("context_"):-len("_loss")] for k in llm if k.startswith("context_")):
        lines.append(f"| {task} | {llm[f'context_{task}_loss']:.3f} | {llm[f'wrong_context_{task}_loss']:.3f} |")
    lines += ["", "Vision encoder: its own validation figures, and linear probes of its features "
              "(`python -m training.probe`, exact-set accuracy of each scene's colours / shapes / sizes):", "",
              "| figure | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in frozen["vision"].items()]
    lines += [f"| probe {attr} ({view}) | {acc:.3f} |" for attr, views in probes.items() for view, acc in views.items()]
    if timings:
        lines += ["", "## Build time", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()] + [f"| total | {sum(timings.values()):.0f} |"]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")
    (out / "report_all.json").write_text(json.dumps({"eval": results, "ablation": ablation, "frozen": frozen,
                                                     "probes": probes, "timings": timings}, indent=2))


def golden_figures(results: dict) -> dict[str, float]:
    """The figures the golden test holds a bundle to, from an `evaluate_bundle` result."""
    captions = results["captions"]
    top = list(captions)[-1]
    return {
        "vqa_accuracy": results["vqa"]["accuracy"],
        "detection_map50": results["detection"]["map50"],
        "detection_map50_95": results["detection"]["map50_95"],
        "retrieval_i2t_r1": results["retrieval"]["i2t_r1"],
        "top_caption_precision": captions[top]["precision"],
        "top_caption_recall": captions[top]["recall"],
        "top_caption_cider": captions[top]["cider"],
    }


def golden_results(bundle_dir: Path, data_dir: Path, n: int = GOLDEN_SCENES, progress: bool = False) -> dict:
    """Evaluate a bundle on the golden scenes (written into `data_dir`), with the wall time it took."""
    from qformer.bundle import load_bundle
    from training.evaluate import evaluate_bundle
    from training.shapes import write_dataset

    write_dataset(data_dir, n=1, seed=0, n_val=1, n_test=n, n_heldout=1, size=(224, 224), progress=False)
    t = time.time()
    out = evaluate_bundle(load_bundle(bundle_dir), data_dir, "test", n, progress=progress)
    out["wall_seconds"] = time.time() - t
    return out


def write_golden(bundle_dir: Path, target: Path) -> dict:
    """Measure the golden figures of `bundle_dir` and write them with their floors to `target`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        results = golden_results(bundle_dir, Path(tmp) / "data", progress=True)
    measured = golden_figures(results)
    golden = {"scenes": GOLDEN_SCENES, "margin": GOLDEN_MARGIN, "wall_seconds": round(results["wall_seconds"], 1),
              "measured": {k: round(v, 4) for k, v in measured.items()},
              "floors": {k: round(max(0.0, v - GOLDEN_MARGIN), 4) for k, v in measured.items()}}
    target.write_text(json.dumps(golden, indent=2) + "\n")
    return golden


def install(out: Path, target: Path = DEMO_DIR) -> None:
    bundle = out / "stage2" / "bundle"
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 2**20
    if size > MAX_BUNDLE_MB:
        raise SystemExit(f"bundle is {size:.1f} MB, over the {MAX_BUNDLE_MB} MB the repository takes")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    shutil.copytree(bundle, target / "bundle")
    for name in ("REPORT.md", "report_all.json"):
        shutil.copy(out / name, target / name)
    golden = write_golden(target / "bundle", target / "golden.json")
    print(f"installed the demo bundle ({size:.1f} MB) into {target}; golden figures: {golden['measured']}")


def main(argv: list[str] | None = None) -> int:
    """Build (and optionally install) the embedded demo model from nothing."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="qbridge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="run the whole pipeline into --out")
    b.add_argument("--out", default="build/demo", help="build directory (default: build/demo)")
    b.add_argument("--install", action="store_true", help="copy the bundle and report into qformer/demo/")
    b.add_argument("--quick", action="store_true", help="a minutes-long smoke build with tiny sizes")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("overrides", nargs="*", help="section.field=value applied to both stage configs")
    i = sub.add_parser("install", help="copy a finished build's bundle and report into qformer/demo/ and "
                                       "measure the golden figures")
    i.add_argument("--out", default="build/demo", help="the build directory")
    args = p.parse_args(argv)
    if args.cmd == "install":
        install(Path(args.out))
        return 0
    import dataclasses

    plan = dataclasses.replace(QUICK if args.quick else Plan(), seed=args.seed, overrides=list(args.overrides))
    out = Path(args.out)
    t = time.time()
    build(out, plan)
    print(f"\ndemo build finished in {(time.time() - t) / 60:.1f} min: {out / 'REPORT.md'}")
    if args.install:
        install(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
