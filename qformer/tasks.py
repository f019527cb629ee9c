"""Task prompts: a few soft prompt vectors learned for one new task (prompt tuning, Lester et al. 2021).

A task prompt is `P` vectors in the LLM's input space, read right after the image's queries:
`[quality][queries][task prompt][BOS prompt]`. Everything else stays frozen, so one bundle serves many
tasks and a request picks one by name (`task`). Each lives in the bundle as
`tasks/<name>.safetensors`: the tensor `vectors` (P, D), and in the header's metadata the task's
description, the question it was trained with, how it scored (`qbridge train prompt` writes it) and the
sha256 of the bundle's model.safetensors it was trained against: the vectors mean something only after
those queries, so a bundle whose bridge was retrained (or souped) refuses its stale tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TASKS_DIR = "tasks"
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class TaskPrompt:
    name: str
    vectors: torch.Tensor  # (P, D)
    description: str = ""
    question: str = ""  # the question it was trained with ("" for a captioning task)
    figures: dict = field(default_factory=dict)  # e.g. accuracy before and after, trained parameters

    @property
    def num_vectors(self) -> int:
        return self.vectors.shape[0]


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"task name {name!r}: use 1-64 lowercase letters, digits, '-' or '_', starting "
                         "with a letter or digit")
    return name


def save_task(bundle_dir: str | os.PathLike, task: TaskPrompt) -> Path:
    """Write `task` into the bundle at `bundle_dir` (replacing one of the same name); returns its file."""
    check_name(task.name)
    out = Path(bundle_dir) / TASKS_DIR
    out.mkdir(exist_ok=True)
    path = out / f"{task.name}.safetensors"
    meta = {"name": task.name, "description": task.description, "question": task.question,
            "figures": json.dumps(task.figures), "bridge_sha256": bridge_sha256(bundle_dir)}
    tmp = path.with_suffix(".tmp")
    save_file({"vectors": task.vectors.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def bridge_sha256(bundle_dir: str | os.PathLike) -> str:
    """The sha256 of the bundle's trainable weights (model.safetensors)."""
    h = hashlib.sha256()
    with open(Path(bundle_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tasks(bundle_dir: str | os.PathLike, hidden_size: int) -> dict[str, TaskPrompt]:
    """Every task prompt in the bundle, by name; a file that is not one, whose vectors do not fit an LLM
    of `hidden_size`, or that was trained against other bridge weights, is an error naming the file."""
    tasks = {}
    files = sorted((Path(bundle_dir) / TASKS_DIR).glob("*.safetensors"))
    bridge = bridge_sha256(bundle_dir) if files else None
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if set(f.keys()) != {"vectors"}:
                raise ValueError(f"{path}: a task prompt holds one tensor, 'vectors'; found {sorted(f.keys())}")
            vectors = f.get_tensor("vectors")
        name = meta.get("name", "")
        if name != path.stem:
            raise ValueError(f"{path}: its metadata names task {name!r}, not {path.stem!r}")
        check_name(name)
        if meta.get("bridge_sha256") != bridge:
            raise ValueError(f"{path}: trained against other bridge weights than this bundle's model.safetensors; "
                             f"train it again (`qbridge train prompt --name {name}`) or remove it")
        if vectors.ndim != 2 or vectors.shape[1] != hidden_size or vectors.shape[0] == 0:
            raise ValueError(f"{path}: vectors {tuple(vectors.shape)} do not fit the LLM (need (P, {hidden_size}))")
        tasks[name] = TaskPrompt(name, vectors, meta.get("description", ""), meta.get("question", ""),
                                 json.loads(meta.get("figures") or "{}"))
    return tasks


def with_task(query_embeds: torch.Tensor, vectors: torch.Tensor | None) -> torch.Tensor:
    """Projected queries (..., Q, D) followed by the task's vectors (P, D): (..., Q + P, D)."""
    if vectors is None:
        return query_embeds
    v = vectors.to(query_embeds.device, query_embeds.dtype)
    return torch.cat([query_embeds, v.expand(*query_embeds.shape[:-2], *v.shape)], dim=-2)
