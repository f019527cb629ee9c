"""Pretrain the demo model's frozen parts on the shapes world: tokenizer, small Llama, small vision encoder.

    python -m training.pretrain tokenizer --out demo/llm
    python -m training.pretrain llm --out demo/llm --tokenizer demo/llm --steps 800
    python -m training.pretrain vision --out demo/vision --tokenizer demo/llm --steps 400

(``--steps 20 --tiny`` shrinks either model into a smoke run; ``--threads N`` sets torch's CPU threads.)
Each step writes a standard transformers directory (config + ``model.safetensors`` + tokenizer or image
processor) and ``pretrain.json`` with the arguments and final metrics. These become the demo's *frozen* LLM
and vision encoder; a Q-Former bridge is trained between them afterwards, exactly as between released weights.

All text comes from the world's own generators (``training.shapes``), scene by scene from a seed, in the
formats the bridge later uses: ``caption: <caption>``, ``question: <q> answer: <a>``, ``detect: <labels>``
and ``detect: <label> x1 y1 x2 y2; ...`` (boxes as numbers in the bridge's 64 location bins). Most documents
are read after a description of their scene (:func:`scene_description`) placed *before* ``<s>``, where the
bridge later puts its queries, so that the frozen LLM has learned to take its answers from there. (Measured:
an earlier demo LLM that saw a context in ~3 % of its texts did not read it: VQA answer loss 1.32 after the
true caption, 1.33 after another scene's. ``evaluate_llm`` reports this gap as ``wrong_context_*``.) The bridge's
``<loc_i>`` rows start at the rows of the numbers ``" i"`` (``training.train.init_location_rows_from_numbers``).
Only train-split scenes are used, so the compositional held-out pairs (``shapes.HELDOUT_PAIRS``) never occur
in any pretraining image or text.

The vision encoder (``Blip2VisionModel``, 128 px, 16 px patches: an 8x8 grid) learns CLIP-style against a
throwaway text tower: image vs caption, plus each object's box-pooled patch tokens vs its phrase, with
one-edit "twin" scenes as hard negatives (see :func:`pretrain_vision`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from random import Random

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from qformer.boxes import BoxCodec
from qformer.prompts import caption_prompt, detect_prompt, vqa_prompt
from training import shapes
from training.shapes import (
    BACKGROUNDS, COLOURS, COLS, LEVELS, NUMBER_WORDS, PLURALS, POSITION_PHRASES, ROWS, SEEN_PAIRS, SHAPES,
    SIZES, Obj, Scene, caption, make_scene, questions, render, training_captions,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# The demo bridge's location bins (training/configs/demo_stage2.json); the LLM reads boxes as these numbers.
LOC_BINS = 64
# Pre-tokenisation: a word with an optional trailing colon ("caption:", " answer:"), a number, a run of
# punctuation, or whitespace; each with its leading space (GPT-2 style). Keeping the colon on the word
# makes every task prompt word a single token; "circle." still splits into " circle" + ".".
PRETOKENIZE_PATTERN = r" ?[A-Za-z]+:?| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+"
# Every word the world writes, fed to the BPE trainer next to the corpus so that words the corpus seldom
# or never shows (counts above four, "middle") still become single tokens.
WORLD_WORDS = tuple(dict.fromkeys(
    list(SHAPES) + list(PLURALS.values()) + list(COLOURS) + list(SIZES) + list(BACKGROUNDS)
    + list(NUMBER_WORDS) + [str(i) for i in range(max(11, LOC_BINS))] + list(ROWS) + list(COLS)
    + " ".join(POSITION_PHRASES.values()).split()
    + "there is are shape shapes object objects background a an and how many what where colour size yes no".split()
))
PROMPT_WORDS = ("caption:", "question:", "answer:", "detect:")
# Image normalisation of the vision encoder: CLIP's constants, as BLIP-2's processor uses.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------- world text


def _reading_order(scene: Scene) -> list[Obj]:
    # The order captions list objects in; detection label sequences follow it too.
    return sorted(scene.objects, key=lambda o: (ROWS.index(scene.cell(o)[0]), COLS.index(scene.cell(o)[1]),
                                                o.box[1], o.box[0]))


def scene_description(scene: Scene, bins: int = LOC_BINS) -> str:
    """The scene as the LLM reads it before ``<s>`` in pretraining, where the bridge's queries sit later.

    Background, then each object in reading order as ``size colour shape x1 y1 x2 y2`` with the corners in
    the bridge's location bins (``BoxCodec(bins)``), so that everything a task asks about is in the context.
    """
    codec = BoxCodec(bins)
    parts = [f"{scene.background} background."]
    for o in _reading_order(scene):
        x1, y1, x2, y2 = codec.encode_box(o.box, scene.width, scene.height)
        parts.append(f"{o.size} {o.colour} {o.shape} {x1} {y1} {x2} {y2}.")
    return " ".join(parts)


def detection_text(scene: Scene, rng: Random, bins: int = LOC_BINS) -> str:
    """``detect: label x1 y1 x2 y2; ...`` in a random order: the bridge's detection sequence with the
    location tokens written as numbers (the bridge's location rows start at these numbers' rows)."""
    codec = BoxCodec(bins)
    objs = list(scene.objects)
    rng.shuffle(objs)
    boxes = [(o.label, codec.encode_box(o.box, scene.width, scene.height)) for o in objs]
    return f"{detect_prompt()} " + "; ".join(f"{label} {' '.join(map(str, b))}" for label, b in boxes)


def scene_documents(scene: Scene, rng: Random, noise: float = 0.1, pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS,
                    bins: int = LOC_BINS, context: float = 0.8) -> list[tuple[str, str, str]]:
    """Task-formatted documents about one scene, as ``(task, context, text)`` (no bos/eos).

    ``context`` is :func:`scene_description` (with probability ``context``; else ``""``); the LLM reads it
    before ``<s>`` and ``text`` after it, so it learns to take every attribute, count and box from what
    precedes ``<s>``: the place where the bridge later puts its queries. Tasks: ``caption`` (one per
    level; without a context, web-like noise at rate ``noise`` keeps generic text in the LLM's
    distribution), ``vqa`` (five questions), ``detect`` (labels in reading order, now and then the
    label-conditioned prompt, and boxes as numbers, always with the context).
    """
    ctx = scene_description(scene, bins)
    out = []
    for c in training_captions(scene, rng, noise, pairs):
        with_ctx = c["noise"] == "none" and rng.random() < context
        out.append(("caption", ctx if with_ctx else "", f"{caption_prompt()} {c['caption']}"))
    for q in questions(scene, rng, 5, pairs):
        out.append(("vqa", ctx if rng.random() < context else "", f"{vqa_prompt(q['question'])} {q['answer']}"))
    labels = [o.label for o in _reading_order(scene)]
    out.append(("detect", ctx if rng.random() < context else "", f"{detect_prompt()} {'; '.join(labels)}"))
    if rng.random() < 0.3:
        wanted = sorted(set(rng.sample(labels, rng.randint(1, len(labels)))))
        out.append(("detect", ctx, f"{detect_prompt(wanted)} {'; '.join(x for x in labels if x in wanted)}"))
    out.append(("boxes", ctx, detection_text(scene, rng, bins)))
    return out


def world_documents(seed: int = 0, n_scenes: int | None = None, *, split: str = "train", noise: float = 0.1,
                    start: int = 0, max_objects: int = 4, bins: int = LOC_BINS,
                    context: float = 0.8) -> Iterator[tuple[str, str, str]]:
    """:func:`scene_documents` of scenes ``start, start+1, ...`` of ``split`` (endless when ``n_scenes`` is None).

    Deterministic by ``(seed, split, index)``, like the scenes themselves. Held-out colour-shape pairs
    appear only for ``split="heldout"``.
    """
    pairs = shapes.ALL_PAIRS if split == "heldout" else SEEN_PAIRS
    index = start
    while n_scenes is None or index < start + n_scenes:
        scene = make_scene(seed, split, index, max_objects=max_objects)
        rng = Random(f"qbridge-pretrain/{seed}/{split}/{index}/text")
        yield from scene_documents(scene, rng, noise if split == "train" else 0.0, pairs, bins, context)
        index += 1


def world_texts(seed: int = 0, n_scenes: int | None = None, *, split: str = "train", noise: float = 0.1,
                start: int = 0, max_objects: int = 4, with_task: bool = False) -> Iterator:
    """The documents of :func:`world_documents` as single strings (context, a space, text), e.g. for the
    tokenizer; ``(task, string)`` pairs with ``with_task``."""
    for task, ctx, text in world_documents(seed, n_scenes, split=split, noise=noise, start=start,
                                           max_objects=max_objects):
        joined = f"{ctx} {text}" if ctx else text
        yield (task, joined) if with_task else joined


def dataset_texts(data_dir: str | Path, split: str = "train") -> list[str]:
    """Task-formatted texts from a written shapes world (or any COCO captions / VQAv2 / COCO instances set)."""
    root = Path(data_dir)
    texts: list[str] = []
    caps = root / f"captions_{split}.json"
    if caps.exists():
        texts += [f"{caption_prompt()} {a['caption']}" for a in json.loads(caps.read_text())["annotations"]]
    qs, ans = root / f"questions_{split}.json", root / f"annotations_vqa_{split}.json"
    if qs.exists() and ans.exists():
        answer = {a["question_id"]: a["multiple_choice_answer"] for a in json.loads(ans.read_text())["annotations"]}
        texts += [f"{vqa_prompt(q['question'])} {answer[q['question_id']]}"
                  for q in json.loads(qs.read_text())["questions"] if q["question_id"] in answer]
    inst = root / f"instances_{split}.json"
    if inst.exists():
        d = json.loads(inst.read_text())
        names = {c["id"]: c["name"] for c in d["categories"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
        per_image: dict[int, list] = {}
        for a in d["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        for image_id, anns in per_image.items():
            w, h = sizes[image_id]

            def reading_order(a, w=w, h=h):  # as _reading_order: 3x3 cell of the box centre, then top-left
                x, y, bw, bh = a["bbox"]
                return min(int(3 * (y + bh / 2) / h), 2), min(int(3 * (x + bw / 2) / w), 2), y, x

            anns.sort(key=reading_order)
            texts.append(f"{detect_prompt()} {'; '.join(names[a['category_id']] for a in anns)}")
    if not texts:
        raise FileNotFoundError(f"no captions_/questions_/instances_{split}.json in {root}")
    return texts


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str] | None = None, out_dir: str | Path | None = None, vocab_size: int = 640,
                    *, seed: int = 0, n_scenes: int = 2000):
    """A byte-level BPE tokenizer for the world, as a ``PreTrainedTokenizerFast``.

    ``texts`` defaults to ``world_texts(seed, n_scenes)``; the world's words are always added to them, so
    every world word (with its leading space) and every task prompt word ("caption:", ...) is one token.
    Specials ``<pad>`` ``<s>`` ``</s>``; ``<s>`` is prepended to every encoding; left padding (generation).
    Saved with ``save_pretrained`` when ``out_dir`` is given.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = list(world_texts(seed, n_scenes) if texts is None else texts)
    # Each world word repeated (with its leading space, as it follows another word), and each prompt as it
    # starts a text, so that their merges outrank accidental pairs.
    corpus += [f" {w}" * 20 for w in WORLD_WORDS + PROMPT_WORDS] + [p for p in PROMPT_WORDS for _ in range(20)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        padding_side="left", model_max_length=256)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _load_tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        return train_tokenizer() if tokenizer is None else AutoTokenizer.from_pretrained(str(tokenizer))
    return tokenizer


def _encode(tokenizer, texts: Sequence[str], max_len: int) -> list[list[int]]:
    """``<s> text </s>`` ids, cut to ``max_len`` (a cut sequence loses its ``</s>``)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    return [(x + [tokenizer.eos_token_id])[:max_len] for x in ids]


def _encode_documents(tokenizer, docs: Sequence[tuple[str, str]], max_len: int) -> list[tuple[list[int], int]]:
    """``context <s> text </s>`` ids and the context's length (in tokens), cut to ``max_len``."""
    contexts = tokenizer([c for c, _ in docs], add_special_tokens=False)["input_ids"]  # "" -> []
    texts = _encode(tokenizer, [t for _, t in docs], max_len)
    return [((c + t)[:max_len], len(c)) for c, t in zip(contexts, texts)]


def _pad(rows: list[list[int]], pad_id: int,
         context: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right padding: every sequence starts at position 0, as after the bridge's prefix. Labels are -100
    on padding and on the first ``context[i]`` tokens of row ``i`` (read, not predicted)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(context or ()):
        labels[i, :n] = -100
    return ids, mask, labels


def _schedule(step: int, steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine down to ``min_ratio`` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # Only matrices decay; norms, biases and temperatures do not.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))



def _run_metrics(losses: list[float], steps: int, start: float, cpu_start: float) -> dict:
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

def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- LLM


def llm_config(tokenizer, *, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
               intermediate_size: int = 688, max_position_embeddings: int = 256):
    """The demo LLM's ``LlamaConfig``. head_dim = hidden_size / num_heads = 64 by default: vLLM's CPU
    attention rejects smaller heads (DESIGN.md section 8)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, rms_norm_eps=1e-5,
    )


class _TextBatches:
    """Length-grouped batches of ``context <s> text </s>`` rows: a pool of ``pool`` batches is drawn, sorted
    by length, cut into batches and shuffled, so that little compute goes to padding. No packing: only a
    scene's own description ever precedes its ``<s>``."""

    def __init__(self, docs: Iterator[tuple[str, str]], tokenizer, batch_size: int, max_len: int, rng: Random,
                 pool: int = 8):
        self.docs, self.tokenizer, self.batch_size, self.max_len = docs, tokenizer, batch_size, max_len
        self.rng, self.pool = rng, pool
        self.ready: list[list[tuple[list[int], int]]] = []

    def __next__(self) -> list[tuple[list[int], int]]:
        if not self.ready:
            docs = [next(self.docs) for _ in range(self.batch_size * self.pool)]
            rows = sorted(_encode_documents(self.tokenizer, docs, self.max_len), key=lambda r: len(r[0]))
            self.ready = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            self.rng.shuffle(self.ready)
        return self.ready.pop()


def _text_stream(data, seed: int, noise: float, rng: Random) -> Iterator[tuple[str, str]]:
    """Endless ``(context, text)`` documents: generated scene by scene, or plain texts (no context)."""
    if data is None:
        gen = world_documents(seed, noise=noise)
        buf: list[tuple[str, str]] = []
        while True:  # a scene's documents are spread over batches, not side by side
            while len(buf) < 4096:
                _, ctx, text = next(gen)
                buf.append((ctx, text))
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    texts = dataset_texts(data) if isinstance(data, (str, Path)) else list(data)
    while True:
        order = list(range(len(texts)))
        rng.shuffle(order)
        yield from (("", texts[i]) for i in order)


@torch.no_grad()
def evaluate_llm(model, tokenizer, seed: int = 0, n_scenes: int = 200, max_len: int = 128,
                 batch_size: int = 64) -> dict[str, float]:
    """Per-token loss and perplexity on clean val-split documents, overall and per task; and, for the
    documents read with a context, the same loss with another scene's description in its place
    (``wrong_context_<task>_loss``): the gap says how much the LLM takes from its context."""
    model.eval()
    docs = list(world_documents(seed, n_scenes, split="val"))
    with_ctx = [d for d in docs if d[1]]
    swapped = [(task, with_ctx[(i + len(with_ctx) // 2) % len(with_ctx)][1], text)
               for i, (task, _, text) in enumerate(with_ctx)]
    out: dict[str, float] = {}
    for prefix, items in (("", docs), ("context_", with_ctx), ("wrong_context_", swapped)):
        sums: Counter = Counter()
        counts: Counter = Counter()
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            rows = _encode_documents(tokenizer, [(c, t) for _, c, t in chunk], max_len)
            ids, mask, labels = _pad([r for r, _ in rows], tokenizer.pad_token_id, [n for _, n in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
            valid = (labels[:, 1:] != -100).float()
            for (task, _, _), row, n in zip(chunk, (nll * valid).sum(1), valid.sum(1)):
                sums[task] += row.item()
                counts[task] += n.item()
        out.update({f"{prefix}{t}_loss": sums[t] / counts[t] for t in sorted(counts)})
        if not prefix:
            out["loss"] = sum(sums.values()) / sum(counts.values())
            out["perplexity"] = math.exp(out["loss"])
    model.train()
    return out


def pretrain_llm(data=None, tokenizer=None, out_dir: str | Path | None = None, steps: int = 800, *, seed: int = 0,
                 batch_size: int = 64, lr: float = 2e-3, warmup: int | None = None, weight_decay: float = 0.1,
                 max_len: int = 128, noise: float = 0.1, hidden_size: int = 256, num_layers: int = 4,
                 num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 688,
                 eval_scenes: int = 200, progress: bool = True) -> dict:
    """Train a small ``LlamaForCausalLM`` from scratch on world text; save it with its tokenizer.

    ``data``: None (text generated scene by scene from ``seed``, endless), a written dataset directory
    (:func:`dataset_texts`), or a list of texts. ``tokenizer``: a tokenizer, its directory, or None (trained
    here). Returns metrics: ``first_loss``/``final_loss`` (train, mean of the first/last 10 steps),
    ``val`` (:func:`evaluate_llm`), ``seconds``, ``seconds_per_step``. With ``out_dir`` the model
    (safetensors), tokenizer and ``pretrain.json`` are written there.
    """
    from transformers import LlamaForCausalLM

    tokenizer = _load_tokenizer(tokenizer)
    torch.set_flush_denormal(True)  # denormal floats in Adam's state can slow CPU steps down many-fold
    torch.manual_seed(seed)
    cfg = llm_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, intermediate_size=intermediate_size)
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = _optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    rng = Random(f"qbridge-pretrain-llm/{seed}")
    batches = _TextBatches(_text_stream(data, seed, noise, rng), tokenizer, batch_size, max_len, rng)

    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="llm", unit="step", disable=not progress)
    for step in bar:
        rows = next(batches)
        ids, mask, labels = _pad([r for r, _ in rows], tokenizer.pad_token_id, [n for _, n in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    metrics = {
        **_run_metrics(losses, steps, start, cpu_start),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val": evaluate_llm(model, tokenizer, seed, eval_scenes, max_len) if eval_scenes else {},
    }
    metrics["final_perplexity"] = math.exp(metrics["final_loss"])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(str(out))
        _write_json(out / "pretrain.json", {"component": "llm", "seed": seed, "batch_size": batch_size, "lr": lr,
                                            "max_len": max_len, "noise": noise, "data": str(data) if isinstance(
                                                data, (str, Path)) else None, "metrics": metrics})
    metrics["model"] = model
    return metrics


# ----------------------------------------------------------------------------- vision


def _overlaps(box, others) -> bool:
    # The world's placement rule (shapes.MAX_IOU / MAX_COVER), so an edited scene is still a valid scene.
    for o in others:
        iw = min(box[2], o.box[2]) - max(box[0], o.box[0])
        ih = min(box[3], o.box[3]) - max(box[1], o.box[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            a = (box[2] - box[0]) * (box[3] - box[1])
            b = (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])
            if inter / (a + b - inter) > shapes.MAX_IOU or inter / min(a, b) > shapes.MAX_COVER:
                return True
    return False


def _fit(box, width: int, height: int) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if w >= width - 2 or h >= height - 2:
        return None
    dx = max(1 - x1, 0) - max(x2 - (width - 1), 0)
    dy = max(1 - y1, 0) - max(y2 - (height - 1), 0)
    return x1 + dx, y1 + dy, x2 + dx, y2 + dy


EDITS = ("colour", "shape", "swap", "size", "move", "background")


def twin_scene(scene: Scene, rng: Random, pairs=SEEN_PAIRS) -> tuple[Scene, str] | None:
    """A hard negative: ``scene`` with one edit (recolour, reshape, swap two colours, resize, move one
    object to another cell, or change the background), or None if no edit applies. Colour-shape pairs stay
    within ``pairs``; placement keeps the world's overlap rule."""
    objs = list(scene.objects)
    kinds = list(EDITS)
    rng.shuffle(kinds)
    for kind in kinds:
        i = rng.randrange(len(objs))
        o = objs[i]
        new = None
        if kind == "colour":
            options = [c for c in COLOURS if c != o.colour and (c, o.shape) in pairs]
            if options:
                new = {i: replace(o, colour=rng.choice(options))}
        elif kind == "shape":
            options = [s for s in SHAPES if s != o.shape and (o.colour, s) in pairs]
            if options:
                new = {i: replace(o, shape=rng.choice(options))}
        elif kind == "swap":
            js = [j for j, p in enumerate(objs) if p.colour != o.colour
                  and (p.colour, o.shape) in pairs and (o.colour, p.shape) in pairs and p.shape != o.shape]
            if js:
                j = rng.choice(js)
                new = {i: replace(o, colour=objs[j].colour), j: replace(objs[j], colour=o.colour)}
        elif kind == "size":
            size = rng.choice([z for z in SIZES if z != o.size])
            scale = sum(SIZES[size]) / sum(SIZES[o.size])
            cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
            w, h = (o.box[2] - o.box[0]) * scale, (o.box[3] - o.box[1]) * scale
            box = _fit((round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)),
                       scene.width, scene.height)
            if box and not _overlaps(box, objs[:i] + objs[i + 1:]):
                new = {i: replace(o, size=size, box=box)}
        elif kind == "move":
            w, h = o.box[2] - o.box[0], o.box[3] - o.box[1]
            for _ in range(20):
                x1, y1 = rng.randint(1, scene.width - w - 1), rng.randint(1, scene.height - h - 1)
                moved = replace(o, box=(x1, y1, x1 + w, y1 + h))
                cell = Scene(0, scene.width, scene.height, "", (moved,)).cell(moved)
                if cell != scene.cell(o) and not _overlaps(moved.box, objs[:i] + objs[i + 1:]):
                    new = {i: moved}
                    break
        else:
            bg = rng.choice([b for b in BACKGROUNDS if b != scene.background])
            return replace(scene, background=bg), kind
        if new:
            return replace(scene, objects=tuple(new.get(k, p) for k, p in enumerate(objs))), kind
    return None


class TextTower(nn.Module):
    """The throwaway text side of contrastive pretraining: a small pre-norm transformer over token ids,
    mean-pooled over real tokens. Word order matters here (it binds colours to shapes and positions to
    objects), so it is not a bag of embeddings."""

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 96,
                 embed_dim: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions[: ids.shape[1]]  # (B, T, dim)
        x = self.norm(self.encoder(x, src_key_padding_mask=mask == 0))
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1))  # (B, embed_dim)


class _Contrastive(nn.Module):
    """Vision encoder + text tower + projections + temperatures.

    Image embedding: the mean of ``last_hidden_state`` over all tokens, so every patch token (what the
    Q-Former later reads) is trained, not only the class token. Region embedding: the patch tokens under an
    object's box, averaged with weights = the fraction of each patch the box covers."""

    def __init__(self, vision, text: TextTower, embed_dim: int):
        super().__init__()
        self.vision, self.text = vision, text
        self.image_proj = nn.Linear(vision.config.hidden_size, embed_dim)
        self.region_proj = nn.Linear(vision.config.hidden_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.region_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + P, D)

    def embed_images(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(hidden.mean(1)), dim=-1)

    def embed_regions(self, hidden: torch.Tensor, image_index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        patches = hidden[image_index, 1:]  # (K, P, D): the class token is not a place
        return F.normalize(self.region_proj(torch.einsum("kp,kpd->kd", weights, patches)), dim=-1)

    def embed_texts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(ids, mask), dim=-1)


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between rows of ``a`` and ``b`` (L2-normalised). ``same[i, j]`` is True where texts i
    and j are equal strings: such pairs are all positives (targets spread over them), not false negatives."""
    logits = logit_scale.exp().clamp(max=100) * a @ b.t()  # (N, N)
    targets = same.float() / same.float().sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def vision_losses(model: _Contrastive, batch: dict) -> dict[str, torch.Tensor]:
    """``contrastive_loss`` (image vs caption) and ``region_loss`` (object box vs object phrase)."""
    hidden = model.encode(batch["pixels"])
    out = {"contrastive_loss": info_nce(model.embed_images(hidden), model.embed_texts(*batch["text"]),
                                        model.logit_scale, batch["same_text"])}
    if "regions" in batch:
        index, weights = batch["regions"]
        out["region_loss"] = info_nce(model.embed_regions(hidden, index, weights),
                                      model.embed_texts(*batch["phrases"]), model.region_logit_scale,
                                      batch["same_phrase"])
    return out


def object_phrase(scene: Scene, obj: Obj) -> str:
    """The detailed caption's sentence for one object, without its full stop."""
    return f"a {obj.size} {obj.colour} {obj.shape} is {POSITION_PHRASES[scene.cell(obj)]}"


def patch_weights(scene: Scene, obj: Obj, grid: int) -> torch.Tensor:
    """(grid * grid,) weights: the fraction of each patch that ``obj``'s box covers, normalised to sum 1."""
    edges_x = torch.linspace(0, scene.width, grid + 1)
    edges_y = torch.linspace(0, scene.height, grid + 1)
    x1, y1, x2, y2 = obj.box
    wx = (torch.minimum(edges_x[1:], torch.tensor(float(x2))) - torch.maximum(edges_x[:-1], torch.tensor(float(x1))))
    wy = (torch.minimum(edges_y[1:], torch.tensor(float(y2))) - torch.maximum(edges_y[:-1], torch.tensor(float(y1))))
    w = wy.clamp(min=0)[:, None] * wx.clamp(min=0)[None, :]  # (grid, grid), row-major like the patch sequence
    return (w / w.sum()).flatten()


def _vision_batch(seed: int, split: str, indices: Sequence[int], levels: Sequence[str], twins: bool,
                  max_objects: int, render_size: int) -> tuple[list, list[str], list[str | None], list[Scene]]:
    """Images, captions, edit kinds and scenes for scenes ``indices``; with ``twins``, each scene is followed by
    its edited twin (edit kind None for the originals)."""
    images, texts, kinds, scenes = [], [], [], []
    pairs = shapes.ALL_PAIRS if split == "heldout" else SEEN_PAIRS
    for index in indices:
        scene = make_scene(seed, split, index, width=render_size, height=render_size, max_objects=max_objects)
        rng = Random(f"qbridge-pretrain-vision/{seed}/{split}/{index}")
        level = rng.choice(levels)
        group = [(scene, None)]
        if twins:
            for _ in range(3):  # an edit can leave the caption unchanged (e.g. a move within a cell row)
                twin = twin_scene(scene, rng, pairs)
                if twin and caption(twin[0], level) != caption(scene, level):
                    group.append(twin)
                    break
        for s, kind in group:
            images.append(render(s))
            texts.append(caption(s, level))
            kinds.append(kind)
            scenes.append(s)
    return images, texts, kinds, scenes


def _collate_vision(images, texts, scenes, tokenizer, processor, grid: int, regions: bool) -> dict:
    batch = {"pixels": processor(images=images, return_tensors="pt").pixel_values,
             "text": _pad(_encode(tokenizer, texts, 96), tokenizer.pad_token_id)[:2],
             "same_text": torch.tensor([[a == b for b in texts] for a in texts])}
    if regions:
        objs = [(i, s, o) for i, s in enumerate(scenes) for o in s.objects]
        phrases = [object_phrase(s, o) for _, s, o in objs]
        batch["regions"] = (torch.tensor([i for i, _, _ in objs]),
                            torch.stack([patch_weights(s, o, grid) for _, s, o in objs]))
        batch["phrases"] = _pad(_encode(tokenizer, phrases, 32), tokenizer.pad_token_id)[:2]
        batch["same_phrase"] = torch.tensor([[a == b for b in phrases] for a in phrases])
    return batch


def vision_config(*, image_size: int = 128, patch_size: int = 16, hidden_size: int = 192, num_layers: int = 4,
                  num_heads: int = 3, intermediate_size: int = 768):
    """The demo vision encoder's ``Blip2VisionConfig``: an 8x8 patch grid (+ class token) at 128 px. head_dim 64;
    at 160 px (a 10x10 grid) a step costs about 1.5 times as much."""
    from transformers import Blip2VisionConfig

    # initializer_range: BLIP-2's default (1e-10) assumes loaded weights; from scratch it must be real.
    return Blip2VisionConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                             num_hidden_layers=num_layers, num_attention_heads=num_heads, image_size=image_size,
                             patch_size=patch_size, initializer_range=0.02)


def image_processor(image_size: int = 128):
    """The encoder's preprocessing (resize, rescale, CLIP normalisation), as transformers' BLIP processor."""
    from transformers import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=list(IMAGE_MEAN),
                                 image_std=list(IMAGE_STD), do_convert_rgb=True)


def _top1(sim: torch.Tensor, same: torch.Tensor) -> tuple[int, int]:
    """Hits of row->column and column->row top-1 retrieval, an equal text counting as a hit."""
    n = torch.arange(sim.shape[0])
    return same[n, sim.argmax(1)].sum().item(), same[sim.argmax(0), n].sum().item()


@torch.no_grad()
def evaluate_vision(model: _Contrastive, tokenizer, processor, *, seed: int = 0, split: str = "val",
                    n_batches: int = 4, batch_size: int = 64, levels: Sequence[str] = ("normal", "detailed"),
                    max_objects: int = 4, render_size: int = 224) -> dict[str, float]:
    """On held-out scenes: in-batch top-1 retrieval (image->text, text->image) over batches of ``batch_size``
    random scenes, an equal caption counting as a hit; region->phrase top-1 over all objects of the batch;
    and twin accuracy (an image scores its own caption above its one-edit twin's caption, and the twin
    likewise), overall and per edit kind."""
    model.eval()
    grid = model.vision.config.image_size // model.vision.config.patch_size
    hits = Counter()
    twin_hits: Counter = Counter()
    twin_total: Counter = Counter()
    for b in range(n_batches):
        indices = range(b * batch_size, (b + 1) * batch_size)
        images, texts, _, scenes = _vision_batch(seed, split, indices, levels, False, max_objects, render_size)
        batch = _collate_vision(images, texts, scenes, tokenizer, processor, grid, True)
        hidden = model.encode(batch["pixels"])
        i2t, t2i = _top1(model.embed_images(hidden) @ model.embed_texts(*batch["text"]).t(), batch["same_text"])
        r2p, p2r = _top1(model.embed_regions(hidden, *batch["regions"]) @ model.embed_texts(*batch["phrases"]).t(),
                         batch["same_phrase"])
        hits.update(i2t=i2t, t2i=t2i, images=len(texts), r2p=r2p, p2r=p2r, regions=len(batch["same_phrase"]))

        images, texts, kinds, scenes = _vision_batch(seed, split, indices[: batch_size // 2], levels, True,
                                                     max_objects, render_size)
        batch = _collate_vision(images, texts, scenes, tokenizer, processor, grid, False)
        sim = model.embed_images(model.encode(batch["pixels"])) @ model.embed_texts(*batch["text"]).t()
        for i, kind in enumerate(kinds):
            if kind is not None:
                base = i - 1  # a twin follows its scene
                twin_hits[kind] += (sim[base, base] > sim[base, i]).item() + (sim[i, i] > sim[i, base]).item()
                twin_total[kind] += 2
    model.train()
    out = {"retrieval_i2t": hits["i2t"] / hits["images"], "retrieval_t2i": hits["t2i"] / hits["images"],
           "region_r2p": hits["r2p"] / hits["regions"], "region_p2r": hits["p2r"] / hits["regions"],
           "twin_accuracy": sum(twin_hits.values()) / max(1, sum(twin_total.values()))}
    out.update({f"twin_{k}": twin_hits[k] / twin_total[k] for k in EDITS if twin_total[k]})
    return out


def pretrain_vision(out_dir: str | Path | None = None, steps: int = 400, *, image_size: int = 128,
                    patch_size: int = 16, hidden_size: int = 192, num_layers: int = 4, num_heads: int = 3,
                    intermediate_size: int = 768, tokenizer=None, text_dim: int = 128, text_layers: int = 2,
                    embed_dim: int = 128, batch_size: int = 64, lr: float = 1e-3, warmup: int | None = None,
                    weight_decay: float = 0.05, seed: int = 0, levels: Sequence[str] = ("normal", "detailed"),
                    twins: bool = True, region_weight: float = 1.0, max_objects: int = 4, render_size: int = 224,
                    eval_batches: int = 4, progress: bool = True) -> dict:
    """Contrastively pretrain a ``Blip2VisionModel`` against a throwaway text tower on world (image, caption)
    pairs rendered on the fly from train-split scenes; save the encoder and its ``BlipImageProcessor``.

    Loss: CLIP's symmetric InfoNCE between image and caption embeddings, plus ``region_weight`` times the same
    loss between each object's box-pooled patch tokens and its phrase ("a small red circle is in the top
    left"; all objects of the batch are negatives), as in grounded pretraining (GLIP, RegionCLIP): it makes
    each patch token say what lies there, which the Q-Former needs for detection and detailed captions.
    Half of each batch is scenes, the other half their one-edit twins (:func:`twin_scene`), so the image
    embedding must tell colours, shapes, sizes, positions and backgrounds apart, not just count objects.
    ``tokenizer`` (the LLM's, its directory, or None: trained here) feeds only the text tower, which is
    discarded. Returns metrics: ``first_loss``/``final_loss`` (summed loss), ``final_losses`` (per term),
    ``val`` (:func:`evaluate_vision`), timings.
    """
    from transformers import Blip2VisionModel

    if levels is None or not set(levels) <= set(LEVELS):
        raise ValueError(f"levels must be a subset of {LEVELS}, got {levels}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    tokenizer = _load_tokenizer(tokenizer)
    processor = image_processor(image_size)
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    vision = Blip2VisionModel(vision_config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                                            num_layers=num_layers, num_heads=num_heads,
                                            intermediate_size=intermediate_size))
    model = _Contrastive(vision, TextTower(len(tokenizer), text_dim, text_layers, embed_dim=embed_dim), embed_dim)
    model.train()
    opt = _optimizer(model, lr, weight_decay)
    warmup = max(1, steps // 10) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    per_step = batch_size // 2 if twins else batch_size
    grid = image_size // patch_size

    losses: list[float] = []
    terms: dict[str, list[float]] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="vision", unit="step", disable=not progress)
    for step in bar:
        images, texts, _, scenes = _vision_batch(seed, "train", range(step * per_step, (step + 1) * per_step),
                                                 levels, twins, max_objects, render_size)
        batch = _collate_vision(images, texts, scenes, tokenizer, processor, grid, region_weight > 0)
        parts = vision_losses(model, batch)
        loss = parts["contrastive_loss"] + region_weight * parts.get("region_loss", 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        for k, v in parts.items():
            terms.setdefault(k, []).append(v.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}",
                            T=f"{1 / model.logit_scale.exp().item():.3f}")
    bar.close()
    metrics = {
        **_run_metrics(losses, steps, start, cpu_start),
        "final_losses": {k: sum(v[-10:]) / len(v[-10:]) for k, v in terms.items()},
        "temperature": 1 / model.logit_scale.exp().item(),
        "parameters": sum(p.numel() for p in vision.parameters()),
        "val": evaluate_vision(model, tokenizer, processor, seed=seed, n_batches=eval_batches, levels=levels,
                               max_objects=max_objects, render_size=render_size) if eval_batches else {},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        vision.save_pretrained(str(out))
        processor.save_pretrained(str(out))
        _write_json(out / "pretrain.json", {"component": "vision", "seed": seed, "batch_size": batch_size,
                                            "lr": lr, "levels": list(levels), "twins": twins,
                                            "region_weight": region_weight, "render_size": render_size,
                                            "metrics": metrics})
    metrics["model"] = vision
    return metrics


# ----------------------------------------------------------------------------- CLI

TINY_LLM = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 96}
TINY_VISION = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 96, "image_size": 64,
               "patch_size": 16, "text_dim": 32, "text_layers": 1, "embed_dim": 32}


def _report(metrics: dict) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k != "model"}, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Pretrain the demo's frozen parts (tokenizer, LLM, vision encoder) on the shapes world."""
    parser = argparse.ArgumentParser(prog="python -m training.pretrain", description=main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p):
        p.add_argument("--out", required=True, type=Path, help="output directory (transformers format)")
        p.add_argument("--seed", type=int, default=0, help="world and initialisation seed")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on world text")
    common(p)
    p.add_argument("--vocab-size", type=int, default=640)
    p.add_argument("--scenes", type=int, default=2000, help="scenes whose text trains the tokenizer")

    p = sub.add_parser("llm", help="pretrain the small Llama on world text")
    common(p)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: train one)")
    p.add_argument("--data", type=Path, default=None,
                   help="a written shapes world / COCO-format directory (default: text generated from --seed)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tiny", action="store_true", help="a tiny model, for smoke runs")

    p = sub.add_parser("vision", help="contrastively pretrain the small BLIP-2 vision encoder")
    common(p)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: train one)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--region-weight", type=float, default=1.0,
                   help="weight of the object-box vs object-phrase loss (0: image-level CLIP loss only)")
    p.add_argument("--no-twins", action="store_true", help="random batches only, no one-edit hard negatives")
    p.add_argument("--tiny", action="store_true", help="a tiny model, for smoke runs")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "tokenizer":
        tok = train_tokenizer(None, args.out, args.vocab_size, seed=args.seed, n_scenes=args.scenes)
        print(f"wrote {args.out}: vocabulary {len(tok)}")
    elif args.command == "llm":
        sizes = TINY_LLM if args.tiny else {}
        metrics = pretrain_llm(args.data, args.tokenizer, args.out, args.steps, seed=args.seed,
                               batch_size=args.batch_size, lr=args.lr, progress=not args.quiet, **sizes)
        print(_report(metrics))
    else:
        sizes = dict(TINY_VISION) if args.tiny else {"image_size": args.image_size, "patch_size": args.patch_size,
                                                      "num_layers": args.layers}
        metrics = pretrain_vision(args.out, args.steps, tokenizer=args.tokenizer, batch_size=args.batch_size,
                                  lr=args.lr, seed=args.seed, twins=not args.no_twins, region_weight=args.region_weight,
                                  progress=not args.quiet,
                                  **sizes)
        print(_report(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
