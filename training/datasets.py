"""Readers for the standard formats: COCO captions, VQAv2, COCO instances, WebDataset shards.

Real COCO / VQAv2 / WebDataset data and the shapes world (``training.shapes``) go through the same
readers. Items are dicts holding an RGB PIL image and the text fields; no preprocessing happens
here (the caller applies the model's image processor).

Unreadable images (missing, truncated, not an image) never crash a run: they are logged once,
counted in ``dataset.skipped`` and skipped.

* Map-style datasets skip by *trying the next index*: ``ds[i]`` returns the item at the first
  readable index ``i, i+1, ...`` (wrapping round). ``len(ds)`` stays the number of annotations and
  any collate works; the price is that the item after a bad one is seen twice per epoch.
  ``RuntimeError`` only if no image at all can be read.
* :class:`WebDatasetShards` drops the sample (or the rest of an unreadable shard).

The counter lives in the process that reads: with ``DataLoader(num_workers>0)`` each worker keeps
its own; the warnings in the log are the complete record.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a path or bytes fully (so truncation fails here) into an RGB image."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        im.load()
        return im.convert("RGB")


def _read_json(path: str | Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _SkipUnreadable(Dataset):
    """Map-style base: subclasses give ``_path(i)`` and ``_item(i, image)``."""

    def __init__(self) -> None:
        self._unreadable: set[str] = set()

    @property
    def skipped(self) -> int:
        """Distinct image files found unreadable so far (in this process)."""
        return len(self._unreadable)

    def _path(self, index: int) -> str:
        raise NotImplementedError

    def _item(self, index: int, image: Image.Image) -> dict:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for step in range(n):
            j = (index + step) % n
            path = self._path(j)
            if path in self._unreadable:
                continue
            try:
                image = load_rgb(path)
            except _IMAGE_ERRORS as e:
                self._unreadable.add(path)
                logger.warning("skipping unreadable image %s (%s: %s)", path, type(e).__name__, e)
                continue
            return self._item(j, image)
        raise RuntimeError(f"no readable image in {type(self).__name__} ({n} items)")


def image_files_from_coco(json_file: str | Path) -> dict[int, str]:
    """``{image_id: file_name}`` from the ``images`` list of any COCO-style JSON file."""
    return {im["id"]: im["file_name"] for im in _read_json(json_file)["images"]}


class CocoCaptions(_SkipUnreadable):
    """One item per caption annotation of a COCO captions file.

    Item: ``image``, ``image_id``, ``caption_id``, ``caption``, plus every other annotation field
    present (e.g. the shapes world's ``level`` and ``noise``, or a stored ``quality`` bin).
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path):
        super().__init__()
        data = _read_json(ann_file)
        self.image_root = Path(image_root)
        self.files = {im["id"]: im["file_name"] for im in data["images"]}
        self.annotations = [a for a in data["annotations"] if a["image_id"] in self.files]
        if len(self.annotations) < len(data["annotations"]):
            logger.warning("%s: %d captions name no listed image and are ignored", ann_file,
                           len(data["annotations"]) - len(self.annotations))

    def __len__(self) -> int:
        return len(self.annotations)

    def _path(self, index: int) -> str:
        return str(self.image_root / self.files[self.annotations[index]["image_id"]])

    def _item(self, index: int, image: Image.Image) -> dict:
        ann = self.annotations[index]
        extra = {k: v for k, v in ann.items() if k not in ("id", "image_id", "caption")}
        return {"image": image, "image_id": ann["image_id"], "caption_id": ann.get("id"),
                "caption": ann["caption"], **extra}


class VqaDataset(_SkipUnreadable):
    """One item per question of a VQAv2-style questions file (+ optional annotations file).

    Item: ``image``, ``image_id``, ``question_id``, ``question``, and from the annotations
    ``answer`` (``multiple_choice_answer``, else the most common of ``answers``; ``None`` without
    annotations), ``answers`` (all answer strings, 10 in VQAv2), ``question_type``,
    ``answer_type``.

    Image files: ``image_files`` maps an image id to a path relative to ``image_root`` (a dict, e.g.
    :func:`image_files_from_coco`, or a function). Without it the VQAv2/COCO convention is used:
    ``COCO_<data_subtype>_<image_id:012d>.jpg`` with ``data_subtype`` from the questions file.
    """

    def __init__(
        self,
        questions_file: str | Path,
        annotations_file: str | Path | None,
        image_root: str | Path,
        image_files: Mapping[int, str] | Callable[[int], str] | None = None,
    ):
        super().__init__()
        data = _read_json(questions_file)
        self.image_root = Path(image_root)
        self.questions = data["questions"]
        if image_files is None:
            subtype = data.get("data_subtype")
            if not subtype:
                raise ValueError(f"{questions_file} has no data_subtype; pass image_files")
            self._file = lambda image_id: f"COCO_{subtype}_{image_id:012d}.jpg"
        elif callable(image_files):
            self._file = image_files
        else:
            self._file = image_files.__getitem__
            kept = [q for q in self.questions if q["image_id"] in image_files]
            if len(kept) < len(self.questions):
                logger.warning("%s: %d questions name an image missing from image_files; ignored",
                               questions_file, len(self.questions) - len(kept))
            self.questions = kept
        self.annotations: dict[int, dict] = {}
        if annotations_file is not None:
            self.annotations = {a["question_id"]: a for a in _read_json(annotations_file)["annotations"]}

    def __len__(self) -> int:
        return len(self.questions)

    def _path(self, index: int) -> str:
        return str(self.image_root / self._file(self.questions[index]["image_id"]))

    def _item(self, index: int, image: Image.Image) -> dict:
        q = self.questions[index]
        ann = self.annotations.get(q["question_id"], {})
        answers = [a["answer"] for a in ann.get("answers", [])]
        answer = ann.get("multiple_choice_answer")
        if answer is None and answers:
            answer = Counter(answers).most_common(1)[0][0]
        return {"image": image, "image_id": q["image_id"], "question_id": q["question_id"],
                "question": q["question"], "answer": answer, "answers": answers,
                "question_type": ann.get("question_type"), "answer_type": ann.get("answer_type")}


class CocoDetection(_SkipUnreadable):
    """One item per image of a COCO instances file (images without objects included).

    Item: ``image``, ``image_id``, ``boxes`` (float32 tensor (N, 4), x1 y1 x2 y2 in pixels),
    ``labels`` (category names), ``category_ids`` (int64 tensor (N,)), ``width``, ``height``.
    Crowd annotations (``iscrowd=1``) are left out unless ``include_crowd``.
    """

    def __init__(self, instances_file: str | Path, image_root: str | Path, include_crowd: bool = False):
        super().__init__()
        data = _read_json(instances_file)
        self.image_root = Path(image_root)
        self.images = data["images"]
        self.categories = {c["id"]: c["name"] for c in data["categories"]}
        self.objects: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for a in data["annotations"]:
            if (include_crowd or not a.get("iscrowd", 0)) and a["image_id"] in self.objects:
                self.objects[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def _path(self, index: int) -> str:
        return str(self.image_root / self.images[index]["file_name"])

    def _item(self, index: int, image: Image.Image) -> dict:
        info = self.images[index]
        anns = self.objects[info["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # (N, 4) xyxy
        return {"image": image, "image_id": info["id"], "boxes": boxes,
                "labels": [self.categories[a["category_id"]] for a in anns],
                "category_ids": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
                "width": info.get("width", image.width), "height": info.get("height", image.height)}


# ----------------------------------------------------------------------------- WebDataset

_IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "ppm", "gif"}
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # webdataset's split: key up to the first dot


def expand_shards(pattern_or_list: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard paths from a list, a glob (``train-*.tar``) or braces (``train-{000000..000009}.tar``)."""
    if not isinstance(pattern_or_list, (str, Path)):
        return [str(p) for p in pattern_or_list]
    pattern = str(pattern_or_list)
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m:
        lo, hi = m.group(1), m.group(2)
        return [pattern[:m.start()] + str(i).zfill(len(lo)) + pattern[m.end():]
                for i in range(int(lo), int(hi) + 1)]
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern]


def _decode(ext: str, data: bytes):
    last = ext.rsplit(".", 1)[-1].lower()
    if last in _IMAGE_EXTS:
        return load_rgb(data)
    if last == "json":
        return json.loads(data)
    if last in ("txt", "text"):
        return data.decode("utf-8")
    if last in ("cls", "cls2", "index"):
        return int(data.decode("utf-8").strip())
    return data


class WebDatasetShards(IterableDataset):
    """Samples from WebDataset tar shards, read with ``tarfile`` (no ``webdataset`` package).

    Members are grouped by key (the name up to the first dot of the basename; a sample's members
    are consecutive, as WebDataset writes them). A sample is a dict: ``__key__``, ``__url__``, one
    entry per extension, decoded (images -> RGB PIL, ``json`` -> object, ``txt`` -> str,
    ``cls`` -> int, anything else -> bytes), and ``image``: the first image member.

    Shards are split across ``world_size`` ranks (``shards[rank::world_size]``) and then across
    DataLoader workers the same way. A sample whose image does not decode is skipped; a missing
    or unreadable shard is skipped from the point it fails; both count in ``skipped``.
    """

    def __init__(self, pattern_or_list, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.shards = expand_shards(pattern_or_list)
        self.rank, self.world_size = rank, world_size
        self.skipped = 0

    def _my_shards(self) -> list[str]:
        shards = self.shards[self.rank::self.world_size]
        worker = get_worker_info()
        return shards if worker is None else shards[worker.id::worker.num_workers]

    def __iter__(self) -> Iterator[dict]:
        for url in self._my_shards():
            yield from self._read_shard(url)

    def _read_shard(self, url: str) -> Iterator[dict]:
        key, members = None, {}
        try:
            with tarfile.open(url, "r:*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    m = _KEY_EXT.match(info.name)
                    if m is None or os.path.basename(info.name).startswith("."):
                        continue
                    if m.group(1) != key:
                        if members:
                            sample = self._sample(url, key, members)
                            if sample is not None:
                                yield sample
                        key, members = m.group(1), {}
                    members[m.group(2)] = tar.extractfile(info).read()
        except (OSError, tarfile.TarError) as e:
            self.skipped += 1
            logger.warning("skipping unreadable shard %s (%s: %s)", url, type(e).__name__, e)
            return
        if members:
            sample = self._sample(url, key, members)
            if sample is not None:
                yield sample

    def _sample(self, url: str, key: str, members: dict[str, bytes]) -> dict | None:
        sample: dict = {"__key__": key, "__url__": url}
        try:
            for ext, data in members.items():
                sample[ext] = _decode(ext, data)
        except (*_IMAGE_ERRORS, UnicodeDecodeError) as e:
            self.skipped += 1
            logger.warning("skipping sample %s in %s: .%s unreadable (%s: %s)", key, url, ext,
                           type(e).__name__, e)
            return None
        image_ext = next((e for e in members if e.rsplit(".", 1)[-1].lower() in _IMAGE_EXTS), None)
        if image_ext is not None:
            sample["image"] = sample[image_ext]
        return sample


# ----------------------------------------------------------------------------- task mixture


class TaskMixture(IterableDataset):
    """Yields ``(task_name, item)``, choosing the task at random in proportion to ``weights``.

    Deterministic given ``seed``, the epoch (:meth:`set_epoch`) and the DataLoader worker id.
    Map-style datasets are read in a shuffled order, reshuffled after each full pass; iterable
    datasets are read in their order and restarted when exhausted. ``num_samples`` items per
    iteration (split across DataLoader workers), or endless when ``None``.
    """

    def __init__(
        self,
        datasets: Mapping[str, Dataset | IterableDataset],
        weights: Mapping[str, float],
        *,
        seed: int = 0,
        num_samples: int | None = None,
    ):
        super().__init__()
        if set(weights) != set(datasets):
            raise ValueError(f"weights name {sorted(weights)}, datasets name {sorted(datasets)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {dict(weights)}")
        self.datasets = dict(datasets)
        self.weights = {k: float(weights[k]) for k in self.datasets}
        self.seed, self.num_samples, self.epoch = seed, num_samples, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("an endless TaskMixture has no length")
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        worker = get_worker_info()
        wid, nworkers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        rng = random.Random(f"task-mixture/{self.seed}/{self.epoch}/{wid}")
        names = [k for k in self.datasets if self.weights[k] > 0]
        weights = [self.weights[k] for k in names]
        streams = {k: self._stream(self.datasets[k], random.Random(rng.random())) for k in names}
        total = None if self.num_samples is None else len(range(wid, self.num_samples, nworkers))
        produced = 0
        while total is None or produced < total:
            name = rng.choices(names, weights)[0]
            yield name, next(streams[name])
            produced += 1

    @staticmethod
    def _stream(dataset, rng: random.Random) -> Iterator:
        while True:
            if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
                empty = True
                for item in dataset:
                    empty = False
                    yield item
            else:
                order = list(range(len(dataset)))
                rng.shuffle(order)
                empty = not order
                for i in order:
                    yield dataset[i]
            if empty:
                raise ValueError(f"{type(dataset).__name__} in a TaskMixture yielded no items")
