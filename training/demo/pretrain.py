"""Pretrain the demo model's frozen parts on the shapes world: tokenizer, small Llama, small vision encoder.

    python -m training.demo.pretrain tokenizer --out demo/llm
    python -m training.demo.pretrain llm --out demo/llm --tokenizer demo/llm --steps 800
    python -m training.demo.pretrain vision --out demo/vision --steps 640

(``--steps 20 --tiny`` shrinks either model into a smoke run; ``--threads N`` sets torch's CPU threads.)
Each step writes a standard transformers directory (config + ``model.safetensors`` + tokenizer or image
processor) and ``pretrain.json`` with the arguments and final metrics. These become the demo's *frozen* LLM
and vision encoder; a Q-Former bridge is trained between them afterwards, exactly as between released weights.

All text comes from the world's own generators (``training.demo.shapes``), scene by scene from a seed, in the
formats the bridge later uses: ``caption: <caption>``, ``question: <q> answer: <a>``, ``detect: <labels>``
and ``detect: <label> x1 y1 x2 y2; ...`` (boxes as numbers in the bridge's 64 location bins). Every clean
document is read after a description of its scene (:func:`scene_description`) placed *before* ``<s>``, where
the bridge later puts its queries, so that the frozen LLM has learned to take its answers from there. A
training row holds one scene: its description once, then all its documents, each masked to see only the
description and itself (:func:`_pack`). Measured with the oracle gate (``training.demo.oracle``, 1500 steps):
one document a row gave caption precision 0.999, VQA 0.62, detection mAP@0.5 0.08; one scene a row, about
three times the documents for the same compute, gave 0.999, 0.69 and 0.99. (An earlier demo LLM that saw a
context in ~3 % of its texts did not read it at all; ``evaluate_llm`` reports that gap as
``wrong_context_*``.) The bridge's
``<loc_i>`` rows start at the rows of the numbers ``" i"`` (``training.parts.init_location_rows_from_numbers``).
More answer signal did not teach the look-ups: the 2500-step LLM continued 300 steps with 16 questions a
scene and answers weighted 5x (``init_from``, ``n_questions``, ``answer_weight``) went from VQA 0.746 to
0.750 on the gate; the defaults stay 8 questions at weight 1.
Only train-split scenes are used, so the compositional held-out pairs (``shapes.HELDOUT_PAIRS``) never occur
in any pretraining image or text.

The vision tower (a small ``ResNetModel``) and its gate live in ``training.demo.vision``; ``vision`` below runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from random import Random
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qformer.boxes import BoxCodec, reading_order_key
from qformer.prompts import caption_prompt, detect_prompt, vqa_prompt
from training.demo import shapes
from training.optim import adamw, lr_schedule, optimizer_step, run_metrics, write_json
from training.demo.shapes import (
    BACKGROUNDS, COLOURS, COLS, NUMBER_WORDS, PLURALS, POSITION_PHRASES, ROWS, SEEN_PAIRS, SHAPES,
    SIZES, Scene, make_scene, questions, reading_order, training_captions,
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


# ----------------------------------------------------------------------------- world text


def scene_description(scene: Scene, bins: int = LOC_BINS) -> str:
    """The scene as the LLM reads it before ``<s>`` in pretraining, where the bridge's queries sit later.

    Background, then each object in reading order as ``row col size colour shape x1 y1 x2 y2`` (its 3x3
    cell, then the corners in the bridge's location bins, ``BoxCodec(bins)``), so that everything a task
    asks about is in the context to be looked up, not computed (where an object is, from its corners, is
    arithmetic a small LLM does not learn in minutes), and a box follows its label as in detection.
    """
    codec = BoxCodec(bins)
    parts = [f"{scene.background} background."]
    for o in reading_order(scene):
        x1, y1, x2, y2 = codec.encode_box(o.box, scene.width, scene.height)
        row, col = scene.cell(o)
        parts.append(f"{row} {col} {o.size} {o.colour} {o.shape} {x1} {y1} {x2} {y2}.")
    return " ".join(parts)


def write_contexts(data_dir: str | Path, split: str = "train", bins: int = LOC_BINS) -> Path:
    """``DATA/contexts_<split>.json``: each scene's :func:`scene_description`, the context stage 2's queries
    learn to write (``data.contexts``, ``run.context_weight``: context distillation)."""
    data = Path(data_dir)
    scenes = json.loads((data / f"scenes_{split}.json").read_text())["scenes"]
    out = data / f"contexts_{split}.json"
    out.write_text(json.dumps({"contexts": [{"image_id": s["id"], "text": scene_description(Scene.from_dict(s), bins)}
                                            for s in scenes]}))
    return out


def detection_target(scene: Scene, bins: int = LOC_BINS, labels: Sequence[str] | None = None) -> str:
    """``label x1 y1 x2 y2; ...`` in reading order, as in the scene description: the bridge's detection
    sequence with the location tokens written as numbers (the bridge's location rows start at these numbers'
    rows). With ``labels``, only those objects."""
    codec = BoxCodec(bins)
    objs = [o for o in reading_order(scene) if labels is None or o.label in labels]
    return "; ".join(f"{o.label} {' '.join(map(str, codec.encode_box(o.box, scene.width, scene.height)))}"
                     for o in objs)


def detection_text(scene: Scene, bins: int = LOC_BINS, labels: Sequence[str] | None = None) -> str:
    """``detect: label x1 y1 x2 y2; ...``: the prompt (label-filtered with ``labels``) and its target."""
    return f"{detect_prompt(list(labels) if labels else None)} {detection_target(scene, bins, labels)}"


class Document(NamedTuple):
    """One pretraining document: ``context <s> prompt target </s>``.

    ``context`` is read before ``<s>`` (where the bridge's queries sit later); ``prompt`` is the task prompt
    (``caption:``, ``question: ... answer:``, ``detect:``); ``target`` is what the LLM learns to write.
    Training predicts every token after ``<s>`` (a run that predicted the targets alone, one document a
    row, reached oracle caption precision 0.19 in 1500 steps); :func:`evaluate_llm` scores the targets.
    """

    task: str
    context: str
    prompt: str
    target: str

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}" if self.prompt else self.target


def scene_documents(scene: Scene, rng: Random, noise: float = 0.1, pairs: tuple[tuple[str, str], ...] = SEEN_PAIRS,
                    bins: int = LOC_BINS, context: float = 1.0, n_questions: int = 8,
                    filtered_detect: float = 0.5) -> list[Document]:
    """Task-formatted documents about one scene.

    ``context`` is the share of clean documents read after :func:`scene_description` (else ``""``); the LLM
    learns to take every attribute, count and box from what precedes ``<s>``: the place where the bridge
    later puts its queries. Tasks: ``caption`` (one level a scene, drawn; without a context, web-like noise at rate
    ``noise`` keeps generic text in the LLM's distribution), ``vqa`` (``n_questions`` questions, every type),
    ``detect`` (boxes as numbers in reading order, always with the context; with probability
    ``filtered_detect`` also the label-filtered prompt). One prompt, one format: an earlier LLM that also
    saw ``detect:`` followed by labels alone could not tell which of the two to write.
    """
    ctx = scene_description(scene, bins)
    out = []
    c = rng.choice(training_captions(scene, rng, noise, pairs))  # one level a scene: captions are long
    with_ctx = c["noise"] == "none" and rng.random() < context
    out.append(Document("caption", ctx if with_ctx else "", caption_prompt(), c["caption"]))
    for q in questions(scene, rng, n_questions, pairs):
        out.append(Document("vqa", ctx if rng.random() < context else "", vqa_prompt(q["question"]), q["answer"]))
    out.append(Document("detect", ctx, detect_prompt(), detection_target(scene, bins)))
    if rng.random() < filtered_detect:
        labels = sorted(set(rng.sample([o.label for o in scene.objects], rng.randint(1, len(scene.objects)))))
        out.append(Document("detect", ctx, detect_prompt(labels), detection_target(scene, bins, labels)))
    return out


def world_scenes(seed: int = 0, n_scenes: int | None = None, *, split: str = "train", noise: float = 0.1,
                 start: int = 0, max_objects: int = 4, bins: int = LOC_BINS,
                 context: float = 1.0, n_questions: int = 8) -> Iterator[list[Document]]:
    """:func:`scene_documents` of scenes ``start, start+1, ...`` of ``split``, a list a scene (endless when
    ``n_scenes`` is None).

    Deterministic by ``(seed, split, index)``, like the scenes themselves. Held-out colour-shape pairs
    appear only for ``split="heldout"``.
    """
    pairs = shapes.ALL_PAIRS if split == "heldout" else SEEN_PAIRS
    index = start
    while n_scenes is None or index < start + n_scenes:
        scene = make_scene(seed, split, index, max_objects=max_objects)
        rng = Random(f"qbridge-pretrain/{seed}/{split}/{index}/text")
        yield scene_documents(scene, rng, noise if split == "train" else 0.0, pairs, bins, context, n_questions)
        index += 1


def world_documents(seed: int = 0, n_scenes: int | None = None, **kw) -> Iterator[Document]:
    """The documents of :func:`world_scenes`, one after another."""
    for docs in world_scenes(seed, n_scenes, **kw):
        yield from docs


def world_texts(seed: int = 0, n_scenes: int | None = None, *, split: str = "train", noise: float = 0.1,
                start: int = 0, max_objects: int = 4, with_task: bool = False) -> Iterator:
    """The documents of :func:`world_documents` as single strings (context, a space, text), e.g. for the
    tokenizer; ``(task, string)`` pairs with ``with_task``."""
    for d in world_documents(seed, n_scenes, split=split, noise=noise, start=start, max_objects=max_objects):
        joined = f"{d.context} {d.text}" if d.context else d.text
        yield (d.task, joined) if with_task else joined


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
        codec = BoxCodec(LOC_BINS)
        sizes = {im["id"]: (im["width"], im["height"]) for im in d["images"]}
        per_image: dict[int, list] = {}
        for a in d["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        for image_id, anns in per_image.items():
            w, h = sizes[image_id]

            anns.sort(key=lambda a, w=w, h=h: reading_order_key(
                (a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]), w, h))
            boxes = [codec.encode_box((x, y, x + bw, y + bh), w, h) for x, y, bw, bh in (a["bbox"] for a in anns)]
            texts.append(f"{detect_prompt()} " + "; ".join(
                f"{names[a['category_id']]} {' '.join(map(str, b))}" for a, b in zip(anns, boxes)))
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


def _encode_documents(tokenizer, docs: Sequence[Document], max_len: int) -> list[tuple[list[int], int]]:
    """``context <s> prompt target </s>`` ids and how many leading tokens are read, not predicted (the
    context, ``<s>`` and the prompt), cut to ``max_len``. The pre-tokenizer splits at word boundaries, so
    the prompt's and the target's ids are the ids of their joined text."""
    contexts = tokenizer([d.context for d in docs], add_special_tokens=False)["input_ids"]  # "" -> []
    prompts = tokenizer([d.prompt for d in docs], add_special_tokens=True)["input_ids"]  # "<s> prompt"
    targets = tokenizer([f" {d.target}" if d.prompt else d.target for d in docs],
                        add_special_tokens=False)["input_ids"]
    return [((c + p + t + [tokenizer.eos_token_id])[:max_len], len(c) + len(p))
            for c, p, t in zip(contexts, prompts, targets)]


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


# ----------------------------------------------------------------------------- LLM


def llm_config(tokenizer, *, hidden_size: int = 256, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
               intermediate_size: int = 688, max_position_embeddings: int = 256):
    """The demo LLM's ``LlamaConfig``. head_dim = hidden_size / num_heads = 64 by default: vLLM's CPU
    attention rejects smaller heads (tests/test_vllm_backend.py serves this architecture)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, head_dim=hidden_size // num_heads,
        intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.02, rms_norm_eps=1e-5,
    )


class Row(NamedTuple):
    """One packed training row: a scene's description once, then each of its documents (see :func:`_pack`)."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0: the description; k: the k-th document; -k: the k-th, read without the description
    labels: list[int]
    weights: list[float]  # each label's weight in the loss (``answer_weight`` on VQA answers, else 1)


def _pack(tokenizer, docs: Sequence[Document], max_len: int, answer_weight: float = 1.0) -> Row:
    """``context <s> doc1 </s> <s> doc2 </s> ...`` as one row, every document seeing the context and
    itself only (:func:`_attention`) and starting at the position it starts at after the context alone.

    Each document is thus computed exactly as if it were read alone after the context, as the bridge reads
    it, while the context is computed once for all of a scene's documents instead of once for each: about
    three times the documents per step for the same compute. Every token after ``<s>`` is predicted
    (prompts too: the question words are a signal about the scene). A document read without a context
    (``Document.context == ""``, web-like noise) does not see the description. A VQA document's answer
    and its ``</s>`` weigh ``answer_weight`` in the loss: an answer is one token of the ~30 a question
    document has, and the one the bridge is judged on.
    """
    context = next((d.context for d in docs if d.context), "")
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    ids, positions, segments, labels = list(ctx), list(range(len(ctx))), [0] * len(ctx), [-100] * len(ctx)
    weights = [0.0] * len(ctx)
    texts = _encode(tokenizer, [d.text for d in docs], max_len)
    read = [len(x) for x in tokenizer([d.prompt for d in docs], add_special_tokens=True)["input_ids"]]
    for k, (d, text, n_read) in enumerate(zip(docs, texts, read), start=1):
        if d.context and d.context != context:
            raise ValueError("documents packed into one row share one context")
        offset = len(ctx) if d.context else 0
        ids += text
        positions += range(offset, offset + len(text))
        segments += [k if d.context else -k] * len(text)
        labels += [-100] + text[1:]  # <s> is read, not predicted
        heavy = answer_weight if d.task == "vqa" else 1.0
        weights += [0.0] + [1.0 if i < n_read else heavy for i in range(1, len(text))]
    return Row(ids, positions, segments, labels, weights)


def _attention(segments: torch.Tensor) -> torch.Tensor:
    """(B, L) segment ids -> (B, 1, L, L) boolean mask, True where query q may attend key k: causal,
    within its own segment, and the description (segment 0) for a document of a positive segment."""
    q, k = segments[:, :, None], segments[:, None, :]
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    allowed = causal & ((q == k) | ((k == 0) & (q > 0)))
    return allowed[:, None]


def _collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of packed rows for ``LlamaForCausalLM``; padding is its own segment."""
    width = max(len(r.ids) for r in rows)
    pad_segment = 10**6
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), pad_segment, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n], positions[i, :n] = torch.tensor(r.ids), torch.tensor(r.positions)
        segments[i, :n], labels[i, :n] = torch.tensor(r.segments), torch.tensor(r.labels)
        weights[i, :n] = torch.tensor(r.weights)
    # Padding is its own segment: real tokens never attend it, and it attends padding only (a fully
    # masked query row would give NaN).
    mask = _attention(segments)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "labels": labels,
            "weights": weights}


def weighted_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of a :func:`_collate` batch, each label weighted by ``batch["weights"]``
    (a weighted mean; with all weights 1 it is ``LlamaForCausalLM``'s own loss)."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    weights = weights * (labels != -100)
    return (nll * weights).sum() / weights.sum().clamp(min=1e-6)


class _TextBatches:
    """Length-grouped batches of packed rows (:func:`_pack`, one scene a row): a pool of ``pool`` batches
    is drawn, sorted by length, cut into batches and shuffled, so that little compute goes to padding."""

    def __init__(self, groups: Iterator[list[Document]], tokenizer, batch_size: int, max_len: int, rng: Random,
                 pool: int = 8, answer_weight: float = 1.0):
        self.groups, self.tokenizer, self.batch_size, self.max_len = groups, tokenizer, batch_size, max_len
        self.rng, self.pool, self.answer_weight = rng, pool, answer_weight
        self.ready: list[list[Row]] = []

    def __next__(self) -> list[Row]:
        if not self.ready:
            rows = sorted((_pack(self.tokenizer, next(self.groups), self.max_len, self.answer_weight)
                           for _ in range(self.batch_size * self.pool)), key=lambda r: len(r.ids))
            self.ready = [rows[i: i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            self.rng.shuffle(self.ready)
        return self.ready.pop()


def _text_stream(data, seed: int, noise: float, rng: Random, context: float = 1.0,
                 n_questions: int = 8, tasks: Sequence[str] | None = None) -> Iterator[list[Document]]:
    """Endless groups of documents: a generated scene's (only those of ``tasks``, when given), or one plain
    text (no context) each."""
    if data is None:
        for docs in world_scenes(seed, noise=noise, context=context, n_questions=n_questions):
            kept = [d for d in docs if tasks is None or d.task in tasks]
            if kept:
                yield kept
    texts = dataset_texts(data) if isinstance(data, (str, Path)) else list(data)
    while True:
        order = list(range(len(texts)))
        rng.shuffle(order)
        yield from ([Document("text", "", "", texts[i])] for i in order)


@torch.no_grad()
def evaluate_llm(model, tokenizer, seed: int = 0, n_scenes: int = 200, max_len: int = 128,
                 batch_size: int = 64) -> dict[str, float]:
    """Per-token loss of the targets (answers, captions, boxes; not the prompts) and perplexity on clean
    val-split documents, each read alone, overall and per task; and, for the
    documents read with a context, the same loss with another scene's description in its place
    (``wrong_context_<task>_loss``): the gap says how much the LLM takes from its context."""
    model.eval()
    docs = list(world_documents(seed, n_scenes, split="val"))
    with_ctx = [d for d in docs if d.context]
    swapped = [d._replace(context=with_ctx[(i + len(with_ctx) // 2) % len(with_ctx)].context)
               for i, d in enumerate(with_ctx)]
    out: dict[str, float] = {}
    for prefix, items in (("", docs), ("context_", with_ctx), ("wrong_context_", swapped)):
        sums: Counter = Counter()
        counts: Counter = Counter()
        for i in range(0, len(items), batch_size):
            chunk = items[i: i + batch_size]
            rows = _encode_documents(tokenizer, chunk, max_len)
            ids, mask, labels = _pad([r for r, _ in rows], tokenizer.pad_token_id, [n for _, n in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
            valid = (labels[:, 1:] != -100).float()
            for d, row, n in zip(chunk, (nll * valid).sum(1), valid.sum(1)):
                sums[d.task] += row.item()
                counts[d.task] += n.item()
        out.update({f"{prefix}{t}_loss": sums[t] / counts[t] for t in sorted(counts)})
        if not prefix:
            out["loss"] = sum(sums.values()) / sum(counts.values())
            out["perplexity"] = math.exp(out["loss"])
    model.train()
    return out


def pretrain_llm(data=None, tokenizer=None, out_dir: str | Path | None = None, steps: int = 800, *, seed: int = 0,
                 batch_size: int = 16, lr: float = 2e-3, warmup: int | None = None, weight_decay: float = 0.1,
                 max_len: int = 128, noise: float = 0.1, context: float = 1.0, hidden_size: int = 256, num_layers: int = 4,
                 num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 688,
                 n_questions: int = 8, answer_weight: float = 1.0, init_from: str | Path | None = None,
                 keep_tables: bool = False, tasks: Sequence[str] | None = None, eval_scenes: int = 200,
                 progress: bool = True) -> dict:
    """Train a small ``LlamaForCausalLM`` from scratch on world text; save it with its tokenizer.

    ``data``: None (text generated scene by scene from ``seed``, endless), a written dataset directory
    (:func:`dataset_texts`), or a list of texts. ``tokenizer``: a tokenizer, its directory, or None (trained
    here). ``batch_size``: rows a step, one scene each (:func:`_pack`; about ten documents a row).
    ``context``: the share of clean documents read after their scene description (measured with the
    oracle gate, 1500 steps: 0.8 gave caption precision 0.45, 1.0 gave 0.999; the bridge always puts
    queries there, so a document without one teaches nothing it needs). ``n_questions``: questions a
    scene; ``answer_weight``: the loss weight of VQA answers (:func:`_pack`). ``init_from``: an LLM
    directory to continue from (its architecture; the size arguments are then unused). ``keep_tables``: the
    input and output token tables stay as they are (a bridge trained against ``init_from`` writes and reads
    the same rows of the continued LLM). ``tasks``: train on the generated documents of these tasks only
    (``caption``, ``vqa``, ``detect``), e.g. ``("vqa",)`` to measure how fast look-ups are learned alone.
    Returns metrics:
    ``first_loss``/``final_loss`` (train, mean of the first/last 10 steps),
    ``val`` (:func:`evaluate_llm`), ``seconds``, ``seconds_per_step``. With ``out_dir`` the model
    (safetensors), tokenizer and ``pretrain.json`` are written there.
    """
    from transformers import LlamaForCausalLM

    tokenizer = _load_tokenizer(tokenizer)
    torch.set_flush_denormal(True)  # denormal floats in Adam's state can slow CPU steps down many-fold
    torch.manual_seed(seed)
    if init_from is not None:
        model = LlamaForCausalLM.from_pretrained(str(init_from), use_safetensors=True)
    else:
        model = LlamaForCausalLM(llm_config(tokenizer, hidden_size=hidden_size, num_layers=num_layers,
                                            num_heads=num_heads, num_kv_heads=num_kv_heads,
                                            intermediate_size=intermediate_size))
    model.train()
    if keep_tables:
        model.get_input_embeddings().weight.requires_grad_(False)
        model.get_output_embeddings().weight.requires_grad_(False)
    opt = adamw(model, lr, weight_decay)
    warmup = max(1, steps // 20) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_schedule(s, steps, warmup))
    rng = Random(f"qbridge-pretrain-llm/{seed}")
    batches = _TextBatches(_text_stream(data, seed, noise, rng, context, n_questions, tasks), tokenizer, batch_size,
                           max_len, rng, answer_weight=answer_weight)

    losses: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc="llm", unit="step", disable=not progress)
    for step in bar:
        loss = weighted_lm_loss(model, _collate(next(batches), tokenizer.pad_token_id))
        losses.append(optimizer_step(model, loss, opt, sched))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    metrics = {
        **run_metrics(losses, steps, start, cpu_start),
        "parameters": sum(p.numel() for p in model.parameters()),
        "val": evaluate_llm(model, tokenizer, seed, eval_scenes, max_len) if eval_scenes else {},
    }
    metrics["final_perplexity"] = math.exp(metrics["final_loss"])
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))  # transformers 5 writes safetensors only
        tokenizer.save_pretrained(str(out))
        write_json(out / "pretrain.json", {"component": "llm", "seed": seed, "batch_size": batch_size, "lr": lr,
                                            "max_len": max_len, "noise": noise, "context": context,
                                            "n_questions": n_questions, "answer_weight": answer_weight,
                                            "init_from": str(init_from) if init_from else None,
                                            "keep_tables": keep_tables, "tasks": list(tasks) if tasks else None,
                                            "data": str(data) if isinstance(
                                                data, (str, Path)) else None, "metrics": metrics})
    metrics["model"] = model
    return metrics


# ----------------------------------------------------------------------------- CLI

TINY_LLM = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 96}


def _report(metrics: dict) -> str:
    return json.dumps({k: v for k, v in metrics.items() if k != "model"}, indent=2, sort_keys=True)


def main(argv: list[str] | None = None) -> int:
    """Pretrain the demo's frozen parts (tokenizer, LLM, vision encoder) on the shapes world."""
    parser = argparse.ArgumentParser(prog="python -m training.demo.pretrain", description=main.__doc__,
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
    p.add_argument("--batch-size", type=int, default=16, help="scenes a step (one packed row each)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--questions", type=int, default=8, help="VQA questions a scene")
    p.add_argument("--tasks", default=None,
                   help="comma-separated tasks to train on (caption, vqa, detect; default: all), e.g. vqa")
    p.add_argument("--tiny", action="store_true", help="a tiny model, for smoke runs")

    p = sub.add_parser("vision", help="pretrain the small ResNet vision tower on dense world labels (training.demo.vision)")
    common(p)
    p.add_argument("--steps", type=int, default=640)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--plain-steps", type=int, default=600,
                   help="then steps teaching it plain backgrounds (training.demo.vision.tune_plain_backgrounds)")
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
                               batch_size=args.batch_size, lr=args.lr, n_questions=args.questions,
                               tasks=tuple(args.tasks.split(",")) if args.tasks else None,
                               progress=not args.quiet, **sizes)
        print(_report(metrics))
    else:
        from training.demo.vision import TINY, pretrain_tower

        sizes = dict(TINY, batch_size=args.batch_size) if args.tiny else {"batch_size": args.batch_size}
        metrics = pretrain_tower(args.out, args.steps, image_size=args.image_size, seed=args.seed, lr=args.lr,
                                 plain_steps=args.plain_steps, progress=not args.quiet, **sizes)
        print(_report(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
