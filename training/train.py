"""BLIP-2 two-stage training on accelerate: one process or many (`accelerate launch`, multi-node).

    qbridge train stage1 --config training/configs/tiny_stage1.json [section.field=value ...]
    qbridge train quality --stage1 runs/tiny-stage1 --data DIR --levels 4
    qbridge train stage2 --config training/configs/tiny_stage2.json [section.field=value ...]
    accelerate launch --num_processes 2 -m training.train stage1 --config ...

Stage 1 trains ln_vision + the Q-Former with ITC + ITM + ITG against the frozen vision tower.
Stage 2 trains ln_vision + the Q-Former's query path + the projection + quality prompts + location rows
with the frozen LLM's LM loss on captions (at their quality level), VQA and detection sequences.
Batches, dropout and ITM negatives are seeded by (seed, step, rank), so resuming is exact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qformer.boxes import BoxCodec
from qformer.bridge import Bridge
from qformer.bundle import load_trainable, save_bundle
from qformer.config import ComponentRef
from qformer.prompts import TaskPrompts
from qformer.qformer import AttentionMode
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig, load_config
from training.data import (
    Example,
    VisionFeatures,
    batch_indices,
    build_feature_cache,
    cache_fingerprint,
    caption_examples,
    detection_examples,
    detection_target,
    load_contexts,
    tokenize_stage2,
    vqa_examples,
    weights_hash,
)
from training.parts import DEC_TOKEN, STAGE1_PARTS, Parts, build_parts
from training.losses import context_loss, gather_with_grad, itc_loss, itg_loss, itm_loss, lm_loss, sample_hard_negatives

class Stage1(nn.Module):
    """ITC + ITM + ITG over ln_vision and the Q-Former (LAVIS `Blip2Qformer.forward`, without process-group calls)."""

    def __init__(self, bridge: Bridge, dec_token_id: int, itc_smoothing: float, itg_smoothing: float):
        super().__init__()
        self.ln_vision, self.qformer = bridge.ln_vision, bridge.qformer
        self.dec_token_id = dec_token_id
        self.itc_smoothing, self.itg_smoothing = itc_smoothing, itg_smoothing

    def forward(self, feats, ids, mask, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        qf = self.qformer
        image = self.ln_vision(feats)
        query = qf(AttentionMode.QUERIES, image_embeds=image).query_output
        text = qf(AttentionMode.TEXT, input_ids=ids, attention_mask=mask).text_output
        # No clamp in LAVIS; a floor keeps 1/temp finite if a run drives it towards zero.
        temp = qf.temp.clamp(min=1e-3, max=0.5)
        itc = itc_loss(qf.image_features(query), qf.text_features(text), temp, rank, world_size, self.itc_smoothing)

        all_image = gather_with_grad(image, rank, world_size)
        all_ids, all_mask = _gather_no_grad(ids, rank, world_size), _gather_no_grad(mask, rank, world_size)
        neg_image, neg_text = sample_hard_negatives(itc["sim_i2t"], itc["sim_t2i"], generator, rank)
        pair_images = torch.cat([image, all_image[neg_image], image])
        pair_ids = torch.cat([ids, ids, all_ids[neg_text]])
        pair_mask = torch.cat([mask, mask, all_mask[neg_text]])
        joint = qf(AttentionMode.BIDIRECTIONAL, image_embeds=pair_images, input_ids=pair_ids, attention_mask=pair_mask)
        itm = itm_loss(qf.itm_logits(joint.query_output))

        dec_ids = ids.clone()
        dec_ids[:, 0] = self.dec_token_id  # [DEC] replaces [CLS]/BOS for the decoder
        causal = qf(AttentionMode.CAUSAL, image_embeds=image, input_ids=dec_ids, attention_mask=mask)
        itg = itg_loss(qf.lm_logits(causal.text_output), dec_ids, mask, self.itg_smoothing)
        return {"itc_loss": itc["itc_loss"], "itm_loss": itm["itm_loss"], "itg_loss": itg["itg_loss"], "temp": temp.detach()}


def _gather_no_grad(x: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if world_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class Stage2(nn.Module):
    """The frozen LLM's LM loss through the bridge, masked on prompt and padding."""

    def __init__(self, bridge: Bridge, context_weight: float = 0.0, context_temperature: float = 0.02):
        super().__init__()
        self.bridge = bridge
        self.context_weight = context_weight
        self.context_temperature = context_temperature

    def forward(self, feats, ids, mask, labels, quality=None, context_ids=None, context_only=False):
        """LM loss; with ``context_ids`` (B, Q) also the context-distillation loss of the same queries; with
        ``context_only`` that loss alone (no LLM forward)."""
        queries = self.bridge.project_queries(feats)
        losses = {} if context_only else lm_loss(self.bridge(feats, ids, mask, quality, query_embeds=queries).logits,
                                                 labels)
        if context_ids is not None:
            ctx = context_loss(queries, self.bridge.base_input_embeddings().detach(), context_ids,
                               self.context_temperature)
            losses["context_loss"] = self.context_weight * ctx["context_loss"]
            losses["context_acc"] = ctx["context_acc"]
        return losses


def context_targets(tokenizer, contexts: dict[int, str], slots: int) -> dict[int, torch.Tensor]:
    """Each image's context as ``slots`` token ids, left-aligned, -100 on the free slots; a context longer
    than the queries cannot be written by them, and stops the run before it starts."""
    out = {}
    for image_id, text in contexts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > slots:
            raise ValueError(f"the context of image {image_id} is {len(ids)} tokens, the bridge has {slots} queries: "
                             "raise model.qformer.num_query_tokens or shorten the contexts")
        out[image_id] = torch.tensor(ids + [-100] * (slots - len(ids)), dtype=torch.long)
    return out


def context_batch(targets: dict[int, torch.Tensor], image_ids: list[int], slots: int) -> torch.Tensor:
    """(B, slots): the batch's rows of :func:`context_targets`; all -100 for an image without a context."""
    none = torch.full((slots,), -100, dtype=torch.long)
    return torch.stack([targets.get(image_id, none) for image_id in image_ids])


STAGE1_TRAINABLE = list(STAGE1_PARTS)
# BLIP-2 stage 2 drops the text branch; here it stays (for retrieval and quality scoring) but frozen.
STAGE2_TRAINABLE = ["ln_vision", "qformer.query_tokens", "qformer.layernorm", "qformer.encoder",
                    "language_projection", "quality_prompts", "loc_embeddings", "loc_head"]


# The Q-Former's text FFN; the query path's `.attention.output.` / `.crossattention.output.` are not in it.
TEXT_FFN = re.compile(r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.")


def freeze_all_but(bridge: Bridge, prefixes: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Declarative freezing: parameters whose names start with a prefix train; the rest do not.

    Naming `qformer.encoder` (rather than `qformer`) means the query path only: the text FFN stays frozen.
    """
    chosen = []
    for name, p in bridge.named_parameters():
        train = name.startswith(tuple(prefixes)) and not name.startswith(("vision.", "llm."))
        if train and "qformer" not in prefixes and TEXT_FFN.match(name):
            train = False
        p.requires_grad_(train)
        if train:
            chosen.append((name, p))
    return chosen


def param_groups(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig) -> list[dict]:
    """No weight decay on biases, norms, embeddings-like tensors; the location rows may get their own lr."""
    decay, no_decay, loc = [], [], []
    for name, p in named:
        if name in ("loc_embeddings", "loc_head"):
            loc.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name in ("qformer.query_tokens", "quality_prompts"):
            no_decay.append(p)
        else:
            decay.append(p)
    lr = cfg.optim.lr
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    if loc:
        groups.append({"params": loc, "weight_decay": 0.0, "lr": lr * cfg.optim.loc_lr_scale})
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: TrainConfig):
    warm, total, floor = cfg.optim.warmup_steps, cfg.run.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _seed(cfg: TrainConfig, step: int, rank: int) -> int:
    return (cfg.run.seed * 1_000_003 + step) * 131 + rank


def _mixed_precision(setting: str) -> str:
    if setting == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return setting


class Logger:
    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tb = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(out_dir / "log.jsonl", "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def train(cfg: TrainConfig, stop_after: int | None = None, progress: bool = True) -> Path:
    """Run a stage; returns the output directory. `stop_after` ends the run early (to test resuming)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if cfg.stage not in ("stage1", "stage2"):
        raise ValueError(f"stage must be stage1 or stage2, not {cfg.stage!r}")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # on CPU-only machines, several processes use gloo (MULTI_CPU)
        mixed_precision=_mixed_precision(cfg.run.mixed_precision),
        # Stage 2 batches are per task, so the quality prompts sit idle in VQA and detection steps.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.stage == "stage2")],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.set_flush_denormal(True)  # denormal floats in Adam's state slow CPU steps down many-fold
    out = Path(cfg.run.out_dir)
    stage2 = cfg.stage == "stage2"
    torch.manual_seed(cfg.run.seed)
    if not cfg.model.init_qformer and not (stage2 and cfg.model.keep_alignment):
        raise ValueError("model.init_qformer=false starts stage 2's own Q-Former from scratch beside the stage-1 "
                         "copy it keeps: it needs stage 2 with model.keep_alignment=true")
    parts = build_parts(cfg, with_llm=stage2)
    bridge = parts.bridge
    if cfg.model.init_from:
        init_from_run(bridge, cfg.model.init_from, stage2, cfg.model.init_qformer)
    named = freeze_all_but(bridge, STAGE2_TRAINABLE if stage2 else STAGE1_TRAINABLE)
    n_train = sum(p.numel() for _, p in named)
    if accelerator.is_main_process:
        print(f"[{cfg.stage}] trainable parameters: {n_train:,} of {sum(p.numel() for p in bridge.parameters()):,}")
    contexts = {}
    if stage2 and cfg.run.context_weight > 0:
        if not cfg.data.contexts:
            raise ValueError("run.context_weight > 0 needs data.contexts (a file of per-image context texts)")
        contexts = context_targets(parts.tokenizer, load_contexts(cfg.data), bridge.cfg.qformer.num_query_tokens)
    if stage2 and cfg.run.context_only_steps and not contexts:
        raise ValueError("run.context_only_steps needs the context-distillation loss (run.context_weight > 0)")
    module = Stage2(bridge, cfg.run.context_weight, cfg.run.context_temperature) if stage2 else Stage1(
        bridge, parts.qformer_tokenizer.convert_tokens_to_ids(DEC_TOKEN), cfg.run.itc_label_smoothing,
        cfg.run.itg_label_smoothing,
    )
    optimizer = torch.optim.AdamW(param_groups(named, cfg), betas=tuple(cfg.optim.betas))
    start = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        state, meta = load_checkpoint(ckpt, optimizer)
        load_trainable(bridge, state, source=str(ckpt))
        start = meta["step"]
        if accelerator.is_main_process:
            print(f"[{cfg.stage}] resuming from {ckpt} at step {start}")
    # With last_epoch = start - 1 the scheduler picks up at `start` from the saved `initial_lr`s.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg), last_epoch=start - 1)
    module, optimizer = accelerator.prepare(module, optimizer)
    bridge.to(accelerator.device)

    tasks = _examples(cfg, stage2, bridge.cfg.prompts)
    features = _feature_source(cfg, parts, tasks, accelerator)
    codec = BoxCodec(bridge.cfg.num_loc_bins) if bridge.cfg.num_loc_bins else None
    names, weights = zip(*[(t, cfg.data.tasks.get(t, 1.0)) for t in tasks]) if stage2 else (("caption",), (1.0,))
    logger = Logger(out, accelerator.is_main_process)
    if accelerator.is_main_process:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    bar = tqdm(total=cfg.run.steps, initial=start, desc=cfg.stage, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    t0, seen = time.time(), 0
    end = min(cfg.run.steps, stop_after) if stop_after else cfg.run.steps
    step = start
    for step in range(start, end):
        module.train()
        totals: dict[str, float] = {}
        for micro in range(cfg.run.grad_accum):
            seed = _seed(cfg, step * cfg.run.grad_accum + micro, rank)
            torch.manual_seed(seed)
            rng = random.Random(seed)
            task = rng.choices(names, weights)[0] if stage2 else "caption"
            pool = tasks[task]
            idx = batch_indices(len(pool), cfg.run.batch_size, cfg.run.seed, step * cfg.run.grad_accum + micro,
                                rank, world, stream=task)
            feats, batch = features([pool[i] for i in idx])
            if feats is None:
                continue
            feats = feats.to(accelerator.device)
            ctx = accelerator.no_sync(module) if micro < cfg.run.grad_accum - 1 else _null()
            with ctx, accelerator.autocast():
                if stage2:
                    context_only = step < cfg.run.context_only_steps  # the LLM is not run: no texts to tokenize
                    ids = mask = labels = None
                    if not context_only:
                        targets = [detection_target(e, codec) if task == "detect" else e.target for e in batch]
                        ids, mask, labels = (t.to(accelerator.device) for t in tokenize_stage2(
                            parts.tokenizer, batch, cfg.data.max_text_tokens, targets))
                    quality = None
                    if task == "caption" and bridge.cfg.num_quality_levels:
                        if any(e.quality is None for e in batch):
                            raise ValueError("captions lack a quality level: run `qbridge train quality` first")
                        quality = torch.tensor([e.quality for e in batch], device=accelerator.device)
                    context_ids = None
                    if contexts:
                        context_ids = context_batch(contexts, [e.image_id for e in batch],
                                                    bridge.cfg.qformer.num_query_tokens).to(accelerator.device)
                    losses = module(feats, ids, mask, labels, quality, context_ids, context_only=context_only)
                else:
                    # Ranks gather each other's ids (ITM negatives), so several pad to one width; one pads to
                    # its longest caption, not to the limit.
                    enc = parts.qformer_tokenizer([e.target for e in batch], truncation=True,
                                                  padding="max_length" if world > 1 else "longest",
                                                  max_length=cfg.data.max_text_tokens, return_tensors="pt")
                    gen = torch.Generator().manual_seed(seed)
                    losses = module(feats, enc.input_ids.to(accelerator.device),
                                    enc.attention_mask.to(accelerator.device), gen, rank, world)
                loss = sum(v for k, v in losses.items() if k.endswith("_loss"))
                accelerator.backward(loss / cfg.run.grad_accum)
            for k, v in losses.items():  # the step's mean over its micro-batches
                key = k if not stage2 else f"{task}_{k}"
                totals[key] = totals.get(key, 0.0) + float(v.detach()) / cfg.run.grad_accum
            seen += len(batch) * world
        if accelerator.sync_gradients and cfg.optim.grad_clip:
            accelerator.clip_grad_norm_([p for _, p in named], cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == end:
            values = {k: float(accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean"))
                      for k, v in totals.items()}
            elapsed = time.time() - t0
            values.update(lr=scheduler.get_last_lr()[0], samples_per_s=seen / max(1e-9, elapsed), world_size=world,
                          samples_since_start=seen, seconds=elapsed)
            logger.log(done, values)
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items() if k.endswith("loss")})
        if (done % cfg.run.save_every == 0 or done == cfg.run.steps) and accelerator.is_main_process:
            save_checkpoint(out, done, bridge.trainable_state_dict(), optimizer,
                            {"stage": cfg.stage, "seed": cfg.run.seed}, keep=cfg.run.keep_checkpoints)
        accelerator.wait_for_everyone()
        bar.update(1)
    bar.close()
    logger.close()
    if step + 1 >= cfg.run.steps and accelerator.is_main_process:
        _finish(cfg, parts, out)
    accelerator.wait_for_everyone()
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _examples(cfg: TrainConfig, stage2: bool, prompts: TaskPrompts) -> dict[str, list[Example]]:
    if not stage2:
        return {"caption": caption_examples(cfg.data, prompts)}
    builders = {"caption": caption_examples, "vqa": vqa_examples, "detect": detection_examples}
    unknown = set(cfg.data.tasks) - set(builders)
    if unknown:
        raise ValueError(f"unknown stage-2 tasks {sorted(unknown)}; known: {sorted(builders)}")
    return {t: builders[t](cfg.data, prompts) for t, w in cfg.data.tasks.items() if w > 0}


def _feature_source(cfg: TrainConfig, parts: Parts, tasks: dict, accelerator) -> VisionFeatures:
    encode = parts.bridge.encode_images
    if not cfg.run.feature_cache:
        return VisionFeatures(encode, parts.image_processor)
    every = [e for pool in tasks.values() for e in pool]
    fingerprint = cache_fingerprint(cfg)
    if accelerator.is_main_process:
        build_feature_cache(every, encode, parts.image_processor, cfg.run.feature_cache, fingerprint=fingerprint)
    accelerator.wait_for_everyone()
    cache = build_feature_cache(every, encode, parts.image_processor, cfg.run.feature_cache, fingerprint=fingerprint)
    return VisionFeatures(encode, parts.image_processor, cache)


def _finish(cfg: TrainConfig, parts: Parts, out: Path) -> None:
    final = out / "final"
    if cfg.stage == "stage1":
        from safetensors.torch import save_file

        final.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in parts.bridge.trainable_state_dict().items()
                 if k.startswith(STAGE1_PARTS)}
        save_file(state, final / "stage1.safetensors")
        parts.qformer_tokenizer.save_pretrained(final / "qformer_tokenizer")
        (final / "bridge_config.json").write_text(json.dumps(parts.bridge.cfg.to_dict(), indent=2))
        print(f"[stage1] wrote {final}")
    else:
        refs = {}
        if not cfg.model.embed_components:
            refs = {"vision_ref": ComponentRef("reference", cfg.model.vision, weights_hash(cfg.model.vision) or None),
                    "llm_ref": ComponentRef("reference", cfg.model.llm, weights_hash(cfg.model.llm) or None)}
        path = save_bundle(parts.bridge, parts.tokenizer, parts.image_processor, out / "bundle",
                           qformer_tokenizer=parts.qformer_tokenizer, **refs)
        print(f"[stage2] wrote bundle {path}")


def load_stage1(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    from safetensors.torch import load_file

    final = Path(run_dir) / "final"
    return load_file(final / "stage1.safetensors"), final


def init_from_run(bridge: Bridge, run_dir: str | Path, stage2: bool, init_qformer: bool = True) -> None:
    """``model.init_from``: a stage-1 run starts either stage (:func:`init_from_stage1`); a stage-2 run (its
    ``bundle/``) continues stage 2 with all of its trainable weights, strictly (a warm restart: this run's
    optimizer and schedule start afresh)."""
    from safetensors.torch import load_file

    run = Path(run_dir)
    if (run / "final" / "stage1.safetensors").is_file():
        init_from_stage1(bridge, run, init_qformer)
        return
    weights = run / "bundle" / "model.safetensors"
    if stage2 and weights.is_file():
        load_trainable(bridge, load_file(weights), source=f"{weights} (a stage-2 run of another architecture?)")
        return
    runs = "a stage-1 run (final/stage1.safetensors)"
    runs += " or a stage-2 run (bundle/model.safetensors)" if stage2 else ""
    raise FileNotFoundError(f"model.init_from={run_dir} is not {runs}")


def init_from_stage1(bridge: Bridge, run_dir: str | Path, init_qformer: bool = True) -> None:
    """Start a stage from a stage-1 run's final weights: its ln_vision + Q-Former, strictly. Stage 1 so
    continues an earlier run (a warm restart: this run's optimizer and schedule start afresh). With a stage-1 copy
    (``BridgeConfig.alignment_qformer``) the whole of stage 1 goes into ``bridge.alignment`` and, unless
    ``init_qformer`` is off (``model.init_qformer``: a Q-Former of another shape, trained from scratch), its
    query path into the Q-Former that stage 2 trains (which has no text branch to receive the rest)."""
    stage1, final = load_stage1(run_dir)
    source = f"{final / 'stage1.safetensors'} (not a stage-1 run of this architecture?)"
    if bridge.alignment is None:
        load_trainable(bridge, stage1, STAGE1_PARTS, source=source)
        return
    # The copy keeps stage 1's own queries; the trained Q-Former may have more (repeated from them).
    load_trainable(bridge, {f"alignment.{k}": v for k, v in stage1.items()}, ("alignment.",), source=source)
    if not init_qformer:
        return
    init = dict(stage1)
    want = bridge.qformer.query_tokens.shape[1]
    if "qformer.query_tokens" in init and init["qformer.query_tokens"].shape[1] != want:
        init["qformer.query_tokens"] = _more_queries(init["qformer.query_tokens"], want)
    query_path = set(k for k in bridge.trainable_state_dict() if k.startswith(STAGE1_PARTS))
    load_trainable(bridge, {k: v for k, v in init.items() if k in query_path}, STAGE1_PARTS, source=source)


def _more_queries(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """Stage 1's (1, Q, H) query tokens for a stage-2 Q-Former with ``n`` queries (with a stage-1 copy kept for
    ITC/ITM, stage 2 may use more queries than stage 1, e.g. one per context token): repeated in turn, plus
    a little noise so that repeats can part ways."""
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(n) % tokens.shape[1]
    return tokens[:, idx] + 0.02 * torch.randn(1, n, tokens.shape[2], generator=g, dtype=tokens.dtype)


def main(argv: list[str] | None = None) -> int:
    """Train a bridge: stage1 (ITC+ITM+ITG), quality (score and bin pairs), stage2 (LM loss), prompt (a task
    prompt for a new task, everything else frozen)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="qbridge train", description=main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for stage in ("stage1", "stage2"):
        s = sub.add_parser(stage, help=f"run {stage} from a JSON config (training/configs/)")
        s.add_argument("--config", required=True, help="JSON config file, e.g. training/configs/tiny_stage1.json")
        s.add_argument("overrides", nargs="*", help="section.field=value, e.g. run.steps=50 optim.lr=3e-4")
        s.add_argument("--no-progress", action="store_true")
    from training.quality import BINNINGS

    q = sub.add_parser("quality", help="score every training pair with a stage-1 model and bin it into K levels")
    q.add_argument("--stage1", required=True, help="stage-1 run directory")
    q.add_argument("--config", required=True, help="the stage-1 config (for the vision tower and data)")
    q.add_argument("--levels", type=int, default=4)
    q.add_argument("--binning", choices=BINNINGS, default="uniform",
                   help="uniform: equal-width bins over the scores, as NoC (default); quantile: equal-count bins")
    q.add_argument("--out", default=None, help="captions JSON to write (default: DATA/captions_<split>_quality.json)")
    t = sub.add_parser("prompt", help="prompt tuning: learn a few soft prompt vectors for a new task, written "
                                      "into the bundle as tasks/NAME.safetensors (training/prompt.py)")
    from training import prompt

    prompt.add_arguments(t)
    args = p.parse_args(argv)
    if args.cmd == "prompt":
        return prompt.run(args)
    if args.cmd == "quality":
        from training.quality import score_and_bin

        score_and_bin(load_config(args.config), args.stage1, args.levels, args.out, args.binning)
        return 0
    train(load_config(args.config, args.overrides), progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
