"""The demo's frozen vision tower: a small ResNet pretrained on dense shapes-world labels, and its gate.

    python -m training.demo.pretrain vision --out demo/vision --steps 640
    python -m training.demo.vision probe --model demo/vision          (the gate alone, on a saved tower)

Why a conv net: measured on 2 cores (README, "The demo model"), a small ``Blip2VisionModel`` trained from scratch
on the same objective stayed at chance on shape after 300 steps, while a ResNet of 1.56 M parameters
reached 0.53 and then 0.87; the ViT was replaced, not tuned.

Input 160 px (a 10x10 grid): at 128 px a 600-step tower read the shape of small objects (13-18 px there) at
0.59, of large ones at 0.96.

Objective (CenterNet-style, on the tower's feature grid, through 1x1 *linear* heads so that what it
learns is linearly readable, the very thing the gate probes): for every cell the shape, colour and size of
the object covering the cell's centre (or "none"); every object also labels the cell holding its box
centre, which predicts "an object is centred here" and the box (centre offset within the cell, width,
height). Scenes are drawn fresh every step, rendered as the bridge sees them (224 px, resized by the
tower's image processor), so the tower cannot memorise a fixed set.

The gate (:func:`probe_tower`): linear probes fit on frozen features of train-split scenes and scored per
object on val-split scenes: shape, colour and size read at the object's centre cell, whether each cell is an
object's centre, and the box regressed there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from random import Random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.demo.shapes import COLOURS, SHAPES, SIZES, Scene, make_scene, random_fill, render

ATTRIBUTES = {"shape": tuple(SHAPES), "colour": tuple(COLOURS), "size": tuple(SIZES)}
# What the gate asks of a frozen tower before anything is trained on it (issue 9).
GATE = {"shape": 0.95, "colour": 0.95, "size": 0.95, "centre_recall": 0.95, "centre_precision": 0.95,
        # The same val scenes on plain fills, read by the same probes (fit on the world's backgrounds). Ours: a
        # tower that never saw a plain fill reads shape 0.51, colour 0.69, size 0.66, centres 0.63 / 0.47 there
        # and the bridge on it collapses on white (VQA 0.01); after tune_plain_backgrounds 0.92 / 0.94 / 0.98 /
        # 0.93 / 0.91 (VQA on white 0.88). Set to catch the first, not to grade the second.
        "shape_plain": 0.85, "colour_plain": 0.85, "size_plain": 0.85, "centre_recall_plain": 0.85,
        "centre_precision_plain": 0.85}


# A smoke-run tower (`qbridge demo build --quick`).
TINY = {"embedding_size": 8, "hidden_sizes": (8, 16, 32), "depths": (1, 1, 1), "batch_size": 8}


# Image normalisation of the vision encoder: CLIP's constants, as BLIP-2's processor uses.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def image_processor(image_size: int = 128):
    """The encoder's preprocessing (resize, rescale, CLIP normalisation), as transformers' BLIP processor."""
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(IMAGE_MEAN),
                                 image_std=list(IMAGE_STD), do_convert_rgb=True)


def tower_config(*, embedding_size: int = 32, hidden_sizes: Sequence[int] = (48, 96, 192),
                 depths: Sequence[int] = (2, 2, 2)):
    """The demo tower's ``ResNetConfig``: stem stride 4, then stages at strides 4, 8, 16: a 10x10 grid of
    ``hidden_sizes[-1]`` channels at 160 px."""
    from transformers import ResNetConfig

    return ResNetConfig(embedding_size=embedding_size, hidden_sizes=list(hidden_sizes), depths=list(depths),
                        layer_type="basic", hidden_act="relu", downsample_in_first_stage=False)


def cell_of(scene: Scene, box: Sequence[float], grid: int) -> tuple[int, int]:
    """(row, col) of the ``grid`` x ``grid`` cell holding the centre of ``box``."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(grid * cy / scene.height), grid - 1), min(int(grid * cx / scene.width), grid - 1)


def dense_targets(scene: Scene, grid: int) -> dict[str, torch.Tensor]:
    """Per-cell targets of one scene, cells row-major (the order of the tower's tokens).

    ``shape``/``colour``/``size``: (grid*grid,) class ids, the last class meaning "none"; ``centre``:
    (grid*grid,) 1 where an object's box centre lies; ``box``: (grid*grid, 4) at those cells, the centre's
    offset within the cell (0..1) and the box's width and height as fractions of the image.
    """
    n = grid * grid
    out = {a: torch.full((n,), len(v), dtype=torch.long) for a, v in ATTRIBUTES.items()}
    out["centre"] = torch.zeros(n)
    out["box"] = torch.zeros(n, 4)
    cw, ch = scene.width / grid, scene.height / grid
    for obj in scene.objects:  # later objects are drawn on top, so they win a shared cell
        x1, y1, x2, y2 = obj.box
        for r in range(grid):
            for c in range(grid):
                if x1 <= (c + 0.5) * cw < x2 and y1 <= (r + 0.5) * ch < y2:
                    for a, values in ATTRIBUTES.items():
                        out[a][r * grid + c] = values.index(getattr(obj, a))
    for obj in scene.objects:  # an object too small to cover any cell centre still labels its centre cell
        r, c = cell_of(scene, obj.box, grid)
        i = r * grid + c
        x1, y1, x2, y2 = obj.box
        for a, values in ATTRIBUTES.items():
            out[a][i] = values.index(getattr(obj, a))
        out["centre"][i] = 1
        out["box"][i] = torch.tensor([(x1 + x2) / 2 / cw - c, (y1 + y2) / 2 / ch - r,
                                      (x2 - x1) / scene.width, (y2 - y1) / scene.height])
    return out


class DenseHeads(nn.Module):
    """1x1 linear heads over the tower's tokens (B, N, C): attribute logits, centre logit, box."""

    def __init__(self, channels: int):
        super().__init__()
        self.attributes = nn.ModuleDict({a: nn.Linear(channels, len(v) + 1) for a, v in ATTRIBUTES.items()})
        self.centre = nn.Linear(channels, 1)
        self.box = nn.Linear(channels, 4)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {a: head(tokens) for a, head in self.attributes.items()}  # (B, N, K+1)
        out["centre"] = self.centre(tokens).squeeze(-1)  # (B, N)
        out["box"] = self.box(tokens)  # (B, N, 4)
        return out


def dense_loss(pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
               background_weight: float = 0.1) -> dict[str, torch.Tensor]:
    """Cross-entropy per attribute over all cells, background cells weighted down (they are most of the
    grid and easy; measured: with equal weights a 600-step tower read the shape of small objects at 0.59),
    BCE for centres (positives up-weighted, as they are a few of the cells), L1 on boxes at centre cells."""
    on_object = (target["shape"] != len(SHAPES)).flatten()
    weight = torch.where(on_object, 1.0, background_weight)
    out = {f"{a}_loss": (F.cross_entropy(pred[a].flatten(0, 1), target[a].flatten(), reduction="none") * weight
                         ).sum() / weight.sum() for a in ATTRIBUTES}
    pos = target["centre"]
    out["centre_loss"] = F.binary_cross_entropy_with_logits(pred["centre"], pos, pos_weight=torch.tensor(8.0))
    m = pos.bool()
    out["box_loss"] = 4 * F.l1_loss(pred["box"][m], target["box"][m]) if m.any() else pred["box"].sum() * 0
    return out


def _batch(seed: int, split: str, indices: Sequence[int], processor, grid: int):
    scenes = [make_scene(seed, split, i) for i in indices]
    pixels = processor(images=[render(s) for s in scenes], return_tensors="pt").pixel_values
    targets = [dense_targets(s, grid) for s in scenes]
    return pixels, {k: torch.stack([t[k] for t in targets]) for k in targets[0]}, scenes


def tokens_of(tower, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's tokens (B, H*W, C) *without* the bridge's position embedding: what the heads and probes
    read."""
    return tower(pixel_values=pixels).last_hidden_state.flatten(2).transpose(1, 2)


def pretrain_tower(out_dir: str | Path | None = None, steps: int = 640, *, image_size: int = 160, seed: int = 0,
                   batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 0.05, warmup: int | None = None,
                   embedding_size: int = 32, hidden_sizes: Sequence[int] = (48, 96, 192),
                   depths: Sequence[int] = (2, 2, 2), plain_steps: int = 0, probe_scenes: tuple[int, int] = (1500, 500),
                   progress: bool = True) -> dict:
    """Train a ``ResNetModel`` from scratch on :func:`dense_targets` of fresh train-split scenes, then
    ``plain_steps`` of :func:`tune_plain_backgrounds`; save the tower and its image processor (transformers
    format) and ``pretrain.json`` with the gate figures (:func:`probe_tower`; ``probe_scenes=(0, 0)`` skips it)."""
    from transformers import ResNetModel

    from training.optim import adamw, lr_schedule, optimizer_step, run_metrics, write_json

    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    processor = image_processor(image_size)
    tower = ResNetModel(tower_config(embedding_size=embedding_size, hidden_sizes=hidden_sizes, depths=depths))
    grid = image_size // 16
    heads = DenseHeads(hidden_sizes[-1])
    model = nn.ModuleDict({"tower": tower, "heads": heads}).train()
    opt = adamw(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, warmup, 0.02))
    losses: list[float] = []
    terms: dict[str, list[float]] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="vision", unit="step", disable=not progress)
    for step in bar:
        # scene indices never repeat: every step draws new scenes
        pixels, target, _ = _batch(seed, "train", range(step * batch_size, (step + 1) * batch_size), processor, grid)
        parts = dense_loss(heads(tokens_of(tower, pixels)), target)
        losses.append(optimizer_step(model, sum(parts.values()), opt, sched))
        for k, v in parts.items():
            terms.setdefault(k, []).append(v.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    tower.eval()
    metrics = {**run_metrics(losses, steps, start, cpu_start),
               "final_losses": {k: sum(v[-10:]) / len(v[-10:]) for k, v in terms.items()},
               "parameters": sum(p.numel() for p in tower.parameters()),
               "plain_backgrounds": tune_plain_backgrounds(tower, processor, plain_steps, seed=seed, progress=progress)
               if plain_steps else {},
               "val": probe_tower(tower, processor, seed=seed, n_fit=probe_scenes[0], n_eval=probe_scenes[1])
               if probe_scenes[0] else {}}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tower.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        write_json(out / "pretrain.json", {"component": "vision", "tower": "ResNetModel", "seed": seed,
                                            "batch_size": batch_size, "lr": lr, "image_size": image_size,
                                            "objective": "dense shapes-world labels, fresh scenes; then plain "
                                                         "backgrounds read as grey, by distillation",
                                            "metrics": metrics})
    metrics["model"] = tower
    return metrics


# Fresh scenes of the background tuning start here in the train split, past any index pretraining draws.
TUNE_OFFSET = 1 << 24


def tune_plain_backgrounds(tower, processor, steps: int, *, seed: int = 0, batch_size: int = 16, lr: float = 3e-4,
                           world_weight: float = 3.0, progress: bool = True) -> dict:
    """Teach a pretrained tower to read scenes on any plain background as it reads them on the world's grey,
    in place, by distillation from a frozen copy of itself (the teacher).

    Every step draws fresh scenes; the tower sees each twice: as the world draws it (target: the teacher's
    tokens of the same image, so what stage 1 and stage 2 read does not move) and painted on a random plain
    fill :func:`random_fill` (target: the teacher's tokens of the scene on grey 128). Loss: mean squared error
    over the teacher's variance, the world's term weighted ``world_weight``. Batch norm keeps its statistics
    (the tower runs in eval mode): only weights move, and the world's images keep their features to the extent
    the loss holds them.
    """
    import copy

    from training.optim import adamw, lr_schedule, optimizer_step

    teacher = copy.deepcopy(tower).eval().requires_grad_(False)
    tower.eval().requires_grad_(True)
    opt = adamw(tower, lr, 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, max(1, steps // 20), 0.02))
    world_losses, plain_losses = [], []
    bar = tqdm(range(steps), desc="vision: plain backgrounds", unit="step", disable=not progress)
    for step in bar:
        first = TUNE_OFFSET + step * batch_size
        scenes = [make_scene(seed, "train", i) for i in range(first, first + batch_size)]
        rng = Random(f"tune/{seed}/{step}")
        world = [render(s) for s in scenes]
        grey = [render(replace(s, background="grey")) for s in scenes]
        plain = [render(s, random_fill(s, rng)) for s in scenes]
        pixels = processor(images=world + grey + plain, return_tensors="pt").pixel_values
        n = len(scenes)
        with torch.no_grad():
            target = tokens_of(teacher, pixels[: 2 * n])  # world, grey
            scale = target.var()
        out = tokens_of(tower, torch.cat([pixels[:n], pixels[2 * n:]]))
        world_loss = F.mse_loss(out[:n], target[:n]) / scale
        plain_loss = F.mse_loss(out[n:], target[n:]) / scale
        optimizer_step(tower, world_weight * world_loss + plain_loss, opt, sched)
        world_losses.append(world_loss.item())
        plain_losses.append(plain_loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(world=f"{sum(world_losses[-10:]) / len(world_losses[-10:]):.4f}",
                            plain=f"{sum(plain_losses[-10:]) / len(plain_losses[-10:]):.4f}")
    bar.close()
    tower.eval().requires_grad_(False)
    tail = lambda v: sum(v[-20:]) / len(v[-20:])  # noqa: E731
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "world_weight": world_weight,
            "world_loss": tail(world_losses), "plain_loss": tail(plain_losses)}


# ----------------------------------------------------------------------------- the gate


@torch.no_grad()
def _features(tower, processor, seed: int, split: str, n: int, batch: int = 100, plain: bool = False):
    """Tokens and dense targets of the first ``n`` scenes of ``split``; ``plain``: each drawn on a random plain
    fill (its own, fixed by the scene's index) instead of its background."""
    grid = None
    feats, targets = [], []
    for i in range(0, n, batch):
        scenes = [make_scene(seed, split, j) for j in range(i, min(n, i + batch))]
        images = [render(s, random_fill(s, Random(f"plain/{seed}/{split}/{s.id}")) if plain else None)
                  for s in scenes]
        pixels = processor(images=images, return_tensors="pt").pixel_values
        hidden = tower(pixel_values=pixels).last_hidden_state  # (B, C, H, W)
        grid = hidden.shape[-1]
        feats.append(hidden.flatten(2).transpose(1, 2))
        targets += [dense_targets(s, grid) for s in scenes]
    return torch.cat(feats), {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def _fit_linear(x: torch.Tensor, y: torch.Tensor, loss_fn, out_dim: int, steps: int = 300) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(x.shape[1], out_dim)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(lin(x), y) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-9)


def _corners(box: torch.Tensor, cells: torch.Tensor, grid: int) -> torch.Tensor:
    """(K, 4) cell-relative centre + size -> (K, 4) corners as fractions of the image."""
    r, c = cells // grid, cells % grid
    cx, cy = (c + box[:, 0]) / grid, (r + box[:, 1]) / grid
    return torch.stack([cx - box[:, 2] / 2, cy - box[:, 3] / 2, cx + box[:, 2] / 2, cy + box[:, 3] / 2], 1)


def probe_tower(tower, processor, *, seed: int = 0, n_fit: int = 1500, n_eval: int = 500) -> dict[str, float]:
    """Linear probes on the frozen tower's tokens, fit on ``n_fit`` train-split scenes, scored on ``n_eval``
    val-split scenes (scenes the pretraining never drew: val indices come from another stream).

    Per object, at the cell holding its centre: ``shape``, ``colour``, ``size`` accuracy; ``box_iou50``: the
    fraction of objects whose linearly regressed box overlaps theirs at IoU >= 0.5. Over all cells:
    ``centre_recall`` (objects whose centre cell the probe marks) and ``centre_precision`` (marked cells that
    hold an object's centre).
    """
    tower.eval()
    xf, tf = _features(tower, processor, seed, "train", n_fit)
    xe, te = _features(tower, processor, seed, "val", n_eval)
    xp, _ = _features(tower, processor, seed, "val", n_eval, plain=True)  # the same val scenes, plain fills
    grid = int(round(xf.shape[1] ** 0.5))
    mean, std = xf.flatten(0, 1).mean(0), xf.flatten(0, 1).std(0) + 1e-5
    xf, xe, xp = (xf - mean) / std, (xe - mean) / std, (xp - mean) / std
    fit_c, eval_c = tf["centre"].bool(), te["centre"].bool()
    out: dict[str, float] = {}
    for a, values in ATTRIBUTES.items():
        lin = _fit_linear(xf[fit_c], tf[a][fit_c], F.cross_entropy, len(values) + 1)
        out[a] = (lin(xe[eval_c]).argmax(-1) == te[a][eval_c]).float().mean().item()
        out[f"{a}_plain"] = (lin(xp[eval_c]).argmax(-1) == te[a][eval_c]).float().mean().item()
    # A plain (unweighted) logistic probe: an up-weighted positive class (4x, first tried) buys recall
    # (0.977) with precision (0.911) on the same features.
    lin = _fit_linear(xf.flatten(0, 1), tf["centre"].flatten(),
                      lambda z, y: F.binary_cross_entropy_with_logits(z.squeeze(-1), y), 1)
    truth = eval_c.flatten()
    for suffix, x in (("", xe), ("_plain", xp)):
        marked = lin(x.flatten(0, 1)).squeeze(-1) > 0
        out[f"centre_recall{suffix}"] = (marked & truth).sum().item() / max(1, truth.sum().item())
        out[f"centre_precision{suffix}"] = (marked & truth).sum().item() / max(1, marked.sum().item())
    lin = _fit_linear(xf[fit_c], tf["box"][fit_c], F.l1_loss, 4)
    cells = torch.arange(grid * grid).expand(len(xe), -1)[eval_c]
    iou = _iou(_corners(lin(xe[eval_c]), cells, grid), _corners(te["box"][eval_c], cells, grid))
    out["box_iou50"] = (iou >= 0.5).float().mean().item()
    out["box_mean_iou"] = iou.mean().item()
    out["objects"] = int(eval_c.sum())
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def probe_saved(model_dir: str | Path, seed: int = 0, scenes: tuple[int, int] = (1500, 500)) -> dict[str, float]:
    """:func:`probe_tower` of a saved tower, loaded as the bridge loads it."""
    from transformers import AutoImageProcessor

    from qformer.bridge import load_vision_encoder

    return probe_tower(load_vision_encoder(str(model_dir)), AutoImageProcessor.from_pretrained(str(model_dir)),
                       seed=seed, n_fit=scenes[0], n_eval=scenes[1])


def gate_failures(figures: dict[str, float], gate: dict[str, float] = GATE) -> list[str]:
    """The gate's missed figures, as readable lines (empty: the tower passes)."""
    return [f"{k} {figure_text(figures.get(k, float('nan')), v)} < {v}" for k, v in gate.items()
            if not figures.get(k, 0) >= v]


def figure_text(value: float, target: float | None = None) -> str:
    """A gate figure to three places, or four where three would read as equal to its target (0.9498, not 0.950);
    a count as it is."""
    if isinstance(value, int):
        return str(value)
    if target is None or f"{value:.3f}" != f"{target:.3f}":
        return f"{value:.3f}"
    return f"{value:.4f}"


def main(argv: list[str] | None = None) -> int:
    """Probe a saved vision tower (the gate of `qbridge demo build`)."""
    p = argparse.ArgumentParser(prog="python -m training.demo.vision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("probe", help="linear probes of a saved tower's frozen features, and the gate")
    q.add_argument("--model", required=True, help="the tower's directory (transformers format)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--fit", type=int, default=1500, help="train-split scenes the probes are fit on")
    q.add_argument("--eval", type=int, default=500, help="val-split scenes they are scored on")
    t = sub.add_parser("tune", help="teach a saved tower plain backgrounds (tune_plain_backgrounds), save it, probe it")
    t.add_argument("--model", required=True, help="the tower's directory (transformers format)")
    t.add_argument("--out", required=True, help="where the tuned tower is written")
    t.add_argument("--steps", type=int, default=600)
    t.add_argument("--seed", type=int, default=0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "tune":
        from transformers import AutoImageProcessor

        from qformer.bridge import load_vision_encoder
        from training.optim import write_json

        tower, processor = load_vision_encoder(args.model), AutoImageProcessor.from_pretrained(args.model)
        tuned = tune_plain_backgrounds(tower, processor, args.steps, seed=args.seed)
        tower.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        write_json(Path(args.out) / "plain_backgrounds.json", {"from": str(args.model), **tuned})
        args.fit, args.eval = 1500, 500
        args.model = args.out
    figures = probe_saved(args.model, args.seed, (args.fit, args.eval))
    failures = gate_failures(figures)
    print(json.dumps({"figures": figures, "gate": GATE, "passed": not failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
