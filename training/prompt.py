"""Prompt tuning (Lester et al., EMNLP 2021): a few soft prompt vectors for a new task, all else frozen.

The Q-Former, the projection and the LLM stay as they are; only `P` vectors in the LLM's input space,
read right after the image's queries, learn the task from VQA-format data (questions + annotations).
The result is a small file inside the bundle (`tasks/<name>.safetensors`, qformer.tasks), which a
request picks by name. Accuracy is measured on held-out images before (the task asked in words alone)
and after (the same words after the learned vectors), and both figures go into the file.

    qbridge train prompt --model BUNDLE --data DIR --name largest-colour \\
        --questions 'questions_largest_{split}.json' --answers 'annotations_largest_{split}.json'
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qformer.bundle import Bundle, load_bundle
from qformer.generation import GenerationConfig, decode_from_queries
from qformer.tasks import TaskPrompt, check_name, save_task, with_task
from training.config import DataSection
from training.data import Example, load_image, tokenize_stage2, vqa_examples
from training.evaluate import vqa_scores
from training.losses import lm_loss

ANSWER_TOKENS = 8  # greedy answer budget when scoring: VQA answers are a few words


@torch.no_grad()
def encode_queries(bundle: Bundle, examples: list[Example], batch_size: int = 32, progress: bool = True
                   ) -> tuple[dict[int, int], torch.Tensor]:
    """Each distinct image's projected queries, once: (row of image id, (N, Q, D))."""
    paths = dict((e.image_id, e.path) for e in examples)
    ids = sorted(paths)
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc="encode", unit="batch", disable=not progress):
        images = [load_image(paths[j]) for j in ids[i: i + batch_size]]
        pixels = bundle.image_processor(images=images, return_tensors="pt").pixel_values
        out.append(bundle.bridge.project_queries(bundle.bridge.encode_images(pixels)))
    return {j: r for r, j in enumerate(ids)}, torch.cat(out)


@torch.no_grad()
def task_accuracy(bundle: Bundle, examples: list[Example], rows: dict[int, int], queries: torch.Tensor,
                  vectors: torch.Tensor | None, batch_size: int = 32) -> float:
    """VQA accuracy of greedy answers to `examples`, with the task's vectors after the queries or without."""
    config = GenerationConfig(max_new_tokens=ANSWER_TOKENS)
    preds = {}
    for i in range(0, len(examples), batch_size):
        part = examples[i: i + batch_size]
        q = with_task(queries[[rows[e.image_id] for e in part]], vectors)
        gens = decode_from_queries(bundle.bridge, bundle.tokenizer, q, [e.prompt for e in part], None, config)
        preds.update({k: g.text for k, g in zip(range(i, i + len(part)), gens)})
    annotations = [{"question_id": k, "answers": [{"answer": e.target}] * 10} for k, e in enumerate(examples)]
    scores = vqa_scores(preds, annotations)
    return sum(scores.values()) / len(scores)


def train_prompt(model: str | Path, data: str | Path, name: str, *, questions: str = "questions_{split}.json",
                 answers: str = "annotations_vqa_{split}.json", steps: int = 300, vectors: int = 8,
                 lr: float = 3e-2, batch_size: int = 32, warmup: int = 20, eval_split: str = "test",
                 eval_n: int | None = 500, description: str = "", seed: int = 0, progress: bool = True) -> TaskPrompt:
    """Learn `vectors` soft prompt vectors for the task in `data`'s train split; score it on `eval_split`
    before and after; write it into the bundle at `model` as task `name`."""
    check_name(name)
    if steps < 1 or vectors < 1:
        raise ValueError(f"prompt tuning needs steps >= 1 and vectors >= 1, got {steps} and {vectors}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    bundle = load_bundle(model)
    bridge = bundle.bridge.requires_grad_(False).eval()
    prompts = bundle.config.prompts

    def examples(split: str) -> list[Example]:
        got = vqa_examples(DataSection(root=str(data), split=split, questions=questions, answers=answers), prompts)
        if not got:
            raise ValueError(f"no {split} questions for the task in {data} ({questions.format(split=split)}, "
                             f"{answers.format(split=split)})")
        return got

    train, held = examples("train"), examples(eval_split)[:eval_n]
    question = json.loads((Path(data) / questions.format(split="train")).read_text())["questions"][0]["question"]
    train_rows, train_q = encode_queries(bundle, train, progress=progress)
    held_rows, held_q = encode_queries(bundle, held, progress=progress)
    before = task_accuracy(bundle, held, held_rows, held_q, None)

    table = bridge.base_input_embeddings()  # Lester's init: rows of the vocabulary, drawn
    init = table[torch.randint(0, table.shape[0], (vectors,))].detach().float().clone()
    soft = torch.nn.Parameter(init)
    optimizer = torch.optim.AdamW([soft], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    bar = tqdm(range(steps), desc=f"prompt {name}", unit="step", disable=not progress)
    loss, first = torch.tensor(float("nan")), None
    for _ in bar:
        batch = [train[rng.randrange(len(train))] for _ in range(batch_size)]
        ids, mask, labels = tokenize_stage2(bundle.tokenizer, batch, 64, [e.target for e in batch])
        q = with_task(train_q[[train_rows[e.image_id] for e in batch]], soft)
        loss = lm_loss(bridge(None, ids, mask, query_embeds=q).logits, labels)["lm_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        first = loss.item() if first is None else first
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vectors_ = soft.detach()
    after = task_accuracy(bundle, held, held_rows, held_q, vectors_)
    figures = {"accuracy_before": round(before, 4), "accuracy_after": round(after, 4), "eval_split": eval_split,
               "eval_questions": len(held), "train_questions": len(train), "trained_parameters": soft.numel(),
               "steps": steps, "first_loss": round(first, 4),
               "final_loss": round(loss.item(), 4),
               "minutes": round((time.perf_counter() - start) / 60, 2), "threads": torch.get_num_threads()}
    task = TaskPrompt(name, vectors_, description, question, figures)
    save_task(bundle.path, task)
    return task


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="the bundle to add the task to (written into it)")
    p.add_argument("--data", required=True, help="data directory with VQA-format questions and annotations")
    p.add_argument("--name", required=True, help="the task's name, chosen per request (`task`)")
    p.add_argument("--questions", default="questions_{split}.json", help="questions file template")
    p.add_argument("--answers", default="annotations_vqa_{split}.json", help="annotations file template")
    p.add_argument("--description", default="", help="what the task does, shown by /v1/models")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--vectors", type=int, default=8, help="soft prompt vectors (trained parameters: this x LLM width)")
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-split", default="test", help="split scored before and after (default: test)")
    p.add_argument("--eval-n", type=int, default=500, help="questions scored (default: 500)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    task = train_prompt(args.model, args.data, args.name, questions=args.questions, answers=args.answers,
                        steps=args.steps, vectors=args.vectors, lr=args.lr, batch_size=args.batch_size,
                        eval_split=args.eval_split, eval_n=args.eval_n, description=args.description,
                        seed=args.seed, progress=not args.no_progress)
    f = task.figures
    print(f"task {task.name}: accuracy {f['accuracy_before']:.3f} asked in words -> {f['accuracy_after']:.3f} with "
          f"{task.num_vectors} learned vectors ({f['trained_parameters']} parameters, {f['steps']} steps, "
          f"{f['minutes']:.1f} min on {f['threads']} threads; {f['eval_questions']} {f['eval_split']} questions)")
    return 0
