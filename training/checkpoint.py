"""Atomic checkpoints with exact resume, safetensors + JSON only (no pickle).

    OUT/checkpoints/step-0000200/{trainable.safetensors, optimizer.safetensors, state.json}
    OUT/checkpoints/latest          the name of the newest complete checkpoint

A checkpoint is written into a temporary directory, then renamed into place, then `latest` is replaced
atomically; an interruption at any point leaves the previous checkpoint as `latest`, loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    extra: dict,
    keep: int = 2,
) -> Path:
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": meta, **extra}, indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step-*") if p.name != name)[: max(0, len(list(root.glob("step-*"))) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict]:
    """-> (trainable tensors, state dict from state.json); restores the optimizer when given."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if optimizer is not None:
        _load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    return load_file(path / "trainable.safetensors"), state
