"""What the demo's pretraining runs share (``training.demo.pretrain``'s LLM, ``training.demo.vision``'s tower): AdamW
with decay on matrices only, warmup-cosine schedule, the optimizer step, run metrics, a JSON writer."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn


def lr_schedule(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine down to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Only matrices decay; norms, biases and temperatures do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def optimizer_step(model: nn.Module, loss: torch.Tensor, opt, sched, clip: float = 1.0) -> float:
    """Backward, clip, step the optimizer and the schedule, clear the gradients; -> the loss."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def run_metrics(losses: list[float], steps: int, start: float, cpu_start: float) -> dict:
    """Timings and the loss curve (means over 10 steps) of a pretraining run."""
    seconds = time.perf_counter() - start

    def mean(xs):
        return sum(xs) / max(1, len(xs))

    return {
        # cpu_seconds (all threads) next to wall seconds: on a shared machine the wall time says little
        "steps": steps, "seconds": seconds, "seconds_per_step": seconds / max(1, steps),
        "cpu_seconds": time.process_time() - cpu_start, "threads": torch.get_num_threads(),
        "loss_curve": {s: mean(losses[max(0, s - 10):s]) for s in sorted({*range(50, steps + 1, 50), steps})},
        "first_loss": mean(losses[:10]),
        "final_loss": mean(losses[-10:]),
    }

def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
