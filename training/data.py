"""Training examples from the standard formats, deterministic batches, and the frozen-feature cache.

Batches are a pure function of (seed, step, rank): a resumed run draws exactly the batches an
uninterrupted run would have drawn, without replaying the data stream.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qformer.boxes import BoxCodec, Detection, reading_order_key
from qformer.prompts import TaskPrompts
from qformer.bundle import weights_sha256
from training.config import DataSection, TrainConfig
from training.losses import lm_labels
from training.datasets import IMAGE_ERRORS, IMAGE_EXTS, KEY_EXT, expand_shards, load_rgb

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    image_id: int
    path: str
    prompt: str  # task prompt (stage 2) or "" (stage 1)
    target: str  # caption / answer / detection sequence (stage 2), caption (stage 1)
    quality: int | None = None  # caption quality level (stage 2)
    objects: tuple = ()  # detection: ((label, (x1, y1, x2, y2)), ...) in pixels
    size: tuple = (0, 0)  # (width, height) of the original image


def _read(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _fmt(template: str, split: str) -> str:
    return template.format(split=split)


# An image inside a tar shard, as an Example's path: "<shard>::<member name>" (load_image reads it).
SHARD_MEMBER = "::"


def load_image(path: str):
    """An RGB image from a file, or from a tar shard member (``shard.tar::key.png``)."""
    if SHARD_MEMBER not in path:
        return load_rgb(path)
    shard, member = path.split(SHARD_MEMBER, 1)
    with tarfile.open(shard, "r:*") as tar:
        try:
            f = tar.extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise OSError(f"no image {member} in {shard}")
        return load_rgb(f.read())


def shard_samples(data: DataSection) -> tuple[dict, ...]:
    """The samples of ``data.shards`` (WebDataset layout: members grouped by key), without decoding images:
    ``{"image_id", "path", "meta"}``, where ``path`` points at the image member and ``meta`` is the
    sample's ``json`` (a ``txt`` member becomes ``meta["caption"]``). Sample metadata read here:
    ``caption`` or ``captions`` (strings or ``{"caption", "quality"}``), ``questions``
    (``{"question", "answer"}``), ``objects`` (``{"label", "box": [x1, y1, x2, y2]}``) with ``width`` and
    ``height``, and ``image_id`` (else the key when it is a number, else the sample's index). An unreadable
    shard is skipped from where it fails, with a warning; an unreadable image is skipped when it is read
    (:class:`VisionFeatures`). Read once per pattern: the caption, VQA and detection builders share it."""
    return _read_shards(str(Path(data.root) / _fmt(data.shards, data.split)))


@functools.lru_cache(maxsize=4)
def _read_shards(pattern: str) -> tuple[dict, ...]:
    samples = []
    for shard in expand_shards(pattern):
        groups: dict[str, dict[str, bytes | str]] = {}
        try:
            with tarfile.open(shard, "r:*") as tar:
                for info in tar:
                    m = KEY_EXT.match(info.name)
                    if not info.isfile() or m is None:
                        continue
                    key, ext = m.group(1), m.group(2).lower()
                    if ext.rsplit(".", 1)[-1] in IMAGE_EXTS:
                        groups.setdefault(key, {}).setdefault("image", info.name)
                    elif ext in ("json", "txt"):
                        groups.setdefault(key, {})[ext] = tar.extractfile(info).read()
        except (OSError, tarfile.TarError) as exc:
            logger.warning("skipping unreadable shard %s from where it fails (%s: %s)", shard, type(exc).__name__, exc)
        for key, g in groups.items():
            if "image" not in g:
                continue
            meta = json.loads(g["json"]) if "json" in g else {}
            if "txt" in g:
                meta.setdefault("caption", g["txt"].decode("utf-8").strip())
            name = Path(key).name
            image_id = meta.get("image_id", int(name) if name.isdigit() else len(samples))
            samples.append({"image_id": image_id, "path": f"{shard}{SHARD_MEMBER}{g['image']}", "meta": meta})
    if not samples:
        raise FileNotFoundError(f"no samples in shards {pattern}")
    return tuple(samples)


def _shard_captions(meta: dict) -> list[tuple[str, int | None]]:
    caps = meta.get("captions") or ([meta["caption"]] if "caption" in meta else [])
    return [(c, None) if isinstance(c, str) else (c["caption"], c.get("quality")) for c in caps]


def caption_examples(data: DataSection, prompts: TaskPrompts, root: Path | None = None) -> list[Example]:
    """`prompts` are the bridge config's (`BridgeConfig.prompts`): the bundle asks what it was trained on."""
    if data.shards:
        return [Example(s["image_id"], s["path"], prompts.caption_prompt(), c, q)
                for s in shard_samples(data) for c, q in _shard_captions(s["meta"])]
    root = Path(root or data.root)
    d = _read(root / _fmt(data.captions, data.split))
    files = {im["id"]: im["file_name"] for im in d["images"]}
    image_root = root / _fmt(data.images, data.split)
    return [
        Example(a["image_id"], str(image_root / files[a["image_id"]]), prompts.caption_prompt(), a["caption"],
                a.get("quality"))
        for a in d["annotations"]
        if a["image_id"] in files
    ]


def load_contexts(data: DataSection) -> dict[int, str]:
    """``data.contexts`` as {image_id: text} (empty when unset)."""
    if not data.contexts:
        return {}
    path = Path(data.root) / _fmt(data.contexts, data.split)
    if not path.is_file():
        raise FileNotFoundError(f"data.contexts names {path}, which does not exist (the demo build writes it in its "
                                "`contexts` step; or set run.context_weight=0)")
    d = _read(path)
    return {int(c["image_id"]): c["text"] for c in d["contexts"]}


def vqa_examples(data: DataSection, prompts: TaskPrompts) -> list[Example]:
    if data.shards:
        return [Example(s["image_id"], s["path"], prompts.vqa_prompt(q["question"]), q["answer"])
                for s in shard_samples(data) for q in s["meta"].get("questions", ())]
    root = Path(data.root)
    files = {im["id"]: im["file_name"] for im in _read(root / _fmt(data.captions, data.split))["images"]}
    answers = {a["question_id"]: a["multiple_choice_answer"] for a in _read(root / _fmt(data.answers, data.split))["annotations"]}
    image_root = root / _fmt(data.images, data.split)
    return [
        Example(q["image_id"], str(image_root / files[q["image_id"]]), prompts.vqa_prompt(q["question"]),
                answers[q["question_id"]])
        for q in _read(root / _fmt(data.questions, data.split))["questions"]
        if q["image_id"] in files and q["question_id"] in answers
    ]


def detection_examples(data: DataSection, prompts: TaskPrompts) -> list[Example]:
    if data.shards:
        return [Example(s["image_id"], s["path"], prompts.detect_prompt(), "", None,
                        tuple((o["label"], tuple(o["box"])) for o in s["meta"]["objects"]),
                        (s["meta"]["width"], s["meta"]["height"]))
                for s in shard_samples(data) if "objects" in s["meta"]]
    root = Path(data.root)
    d = _read(root / _fmt(data.instances, data.split))
    names = {c["id"]: c["name"] for c in d["categories"]}
    objects: dict[int, list] = {im["id"]: [] for im in d["images"]}
    for a in d["annotations"]:
        if not a.get("iscrowd", 0) and a["image_id"] in objects:
            x, y, w, h = a["bbox"]
            objects[a["image_id"]].append((names[a["category_id"]], (x, y, x + w, y + h)))
    image_root = root / _fmt(data.images, data.split)
    return [
        Example(im["id"], str(image_root / im["file_name"]), prompts.detect_prompt(), "", None,
                tuple(objects[im["id"]]), (im["width"], im["height"]))
        for im in d["images"]
    ]


def detection_target(example: Example, codec: BoxCodec) -> str:
    """Objects in reading order (``qformer.boxes.reading_order_key``), the order in which the frozen LLM
    has learned to read and write them; a random order (Pix2Seq's choice for a trained decoder) would
    make a frozen LLM search its context for each box."""
    w, h = example.size
    objs = sorted(example.objects, key=lambda o: reading_order_key(o[1], w, h))
    return codec.encode([Detection(label, box) for label, box in objs], w, h)


def tokenize_stage2(tokenizer, examples: list[Example], max_tokens: int, targets: list[str]):
    """Right-padded `BOS prompt target EOS` rows and labels that score only `target EOS`."""
    rows, prompt_lens = [], []
    for e, target in zip(examples, targets):
        prompt = tokenizer(e.prompt).input_ids
        answer = tokenizer(" " + target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append((prompt + answer)[:max_tokens])
        prompt_lens.append(len(prompt))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask, lm_labels(ids, mask, torch.tensor(prompt_lens))


def batch_indices(n: int, batch_size: int, seed: int, step: int, rank: int, world_size: int, stream: str = "") -> list[int]:
    """Distinct indices for this rank's share of a global batch; a pure function of its arguments."""
    rng = random.Random(f"{seed}/{stream}/{step}")
    total = batch_size * world_size
    picks = rng.sample(range(n), total) if total <= n else [rng.randrange(n) for _ in range(total)]
    return picks[rank * batch_size : (rank + 1) * batch_size]


class VisionFeatures:
    """Frozen vision features by image: from an on-disk cache, or encoded on the fly.

    Unreadable images are skipped and counted (`skipped`), never a crash.
    """

    def __init__(self, encode, image_processor, cache: dict[int, torch.Tensor] | None = None):
        self.encode = encode  # pixel_values -> (B, N, D) features
        self.image_processor = image_processor
        self.cache = cache
        self.skipped: set[str] = set()

    def __call__(self, examples: list[Example]) -> tuple[torch.Tensor | None, list[Example]]:
        """-> features (B', N, D) for the examples that could be read, and those examples."""
        if self.cache is not None:
            kept = [e for e in examples if e.image_id in self.cache]
            if not kept:
                return None, []
            return torch.stack([self.cache[e.image_id] for e in kept]).float(), kept
        images, kept = [], []
        for e in examples:
            if e.path in self.skipped:
                continue
            try:
                images.append(load_image(e.path))
                kept.append(e)
            except IMAGE_ERRORS as exc:
                self.skipped.add(e.path)
                logger.warning("skipping unreadable image %s (%s)", e.path, type(exc).__name__)
        if not images:
            return None, []
        pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
        return self.encode(pixels).float(), kept


def weights_hash(path: str) -> str:
    """The SHA-256 of a local component's weights; "" for a hub id (its revision is part of the name)."""
    try:
        return weights_sha256(path)
    except Exception:
        return ""


def cache_fingerprint(cfg: TrainConfig) -> str:
    """What the frozen features depend on: the tower's weights and the dataset split, not the task mix or which
    of the split's images a run uses, so that stage 1, stage 2, quality scoring and the ablation's variants (a
    filtered subset among them) on one split share one cache (``build_feature_cache`` adds images it lacks)."""
    return f"{weights_hash(cfg.model.vision) or cfg.model.vision}|{cfg.data.root}|{cfg.data.split}"


def build_feature_cache(
    examples: list[Example], encode, image_processor, out_dir: str | Path, batch_size: int = 32, fingerprint: str = ""
) -> dict[int, torch.Tensor]:
    """Encode every distinct image once and store the features (fp16) in OUT/features.safetensors.

    A cache with the same fingerprint (vision weights + dataset split) is reused, and only the images it lacks
    are encoded and added; one with another fingerprint is replaced. Images that cannot be read are recorded
    (``skipped``) and not tried again.
    """
    out = Path(out_dir)
    meta_file, weights = out / "meta.json", out / "features.safetensors"
    paths: dict[int, str] = {}
    for e in examples:
        paths.setdefault(e.image_id, e.path)
    feats: dict[str, torch.Tensor] = {}
    skipped: list[int] = []
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() and weights.is_file() else {}
    if meta.get("fingerprint") == fingerprint:
        feats, skipped = dict(load_file(weights)), list(meta.get("skipped_ids", []))
    missing = sorted(set(paths) - {int(k) for k in feats} - set(skipped))
    if not missing and meta.get("fingerprint") == fingerprint:
        return {int(k): v for k, v in feats.items()}
    source = VisionFeatures(encode, image_processor)
    for i in tqdm(range(0, len(missing), batch_size), desc="caching vision features", unit="batch"):
        chunk = [Example(j, paths[j], "", "") for j in missing[i : i + batch_size]]
        with torch.no_grad():
            f, kept = source(chunk)
        for e, row in zip(kept, f if f is not None else []):
            feats[str(e.image_id)] = row.to(torch.float16).contiguous()
    skipped += [j for j in missing if str(j) not in feats]
    out.mkdir(parents=True, exist_ok=True)
    # Both files are replaced, never rewritten in place: a cache directory copied with hard links (`cp -al` of
    # a build) must not change its original, and an interrupted write must not leave half a file.
    tmp = weights.with_suffix(".tmp")
    save_file(feats, tmp)
    os.replace(tmp, weights)
    tmp = meta_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "images": len(feats), "skipped": len(skipped),
                               "skipped_ids": sorted(skipped)}))
    os.replace(tmp, meta_file)
    return {int(k): v for k, v in feats.items()}
