"""Training configs: JSON files in `training/configs/`, overridable from the command line.

    qbridge train stage1 --config training/configs/tiny_stage1.json run.steps=20 optim.lr=3e-4
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class ModelSection:
    vision: str = ""  # hub id or directory of the frozen vision tower (and its image processor)
    llm: str = ""  # hub id or directory of the frozen causal LM (and its tokenizer); stage 2
    qformer: dict = field(default_factory=dict)  # QFormerConfig fields; encoder_hidden_size comes from the tower
    qformer_tokenizer: str = ""  # text tokenizer of the Q-Former; defaults to the LLM's (a [DEC] token is added)
    # a stage-1 run directory whose weights start this stage: stage 2 takes its ln_vision + Q-Former; stage 1
    # continues from all of it (fresh optimizer and schedule). A stage-2 run directory continues stage 2 from
    # all of its trainable weights (its bundle/), likewise a warm restart
    init_from: str = ""
    # stage 2: keep init_from's ln_vision + Q-Former, frozen, in the bundle for ITC/ITM (retrieval, alignment
    # scores); the Q-Former trained here then drops its text branch (BridgeConfig.alignment_qformer)
    keep_alignment: bool = False
    # stage 2 with keep_alignment: start the trained Q-Former from init_from's query path; off, from scratch
    # (the demo's: a Q-Former of its own shape learns the scene description faster without stage 1's start)
    init_qformer: bool = True
    num_quality_levels: int = 0
    quality_prompt_len: int = 4
    quality_names: list = field(default_factory=list)
    num_loc_bins: int = 0
    prompts: str = "qbridge"  # task prompt preset (qformer.prompts.PRESETS) trained on and written into the bundle
    embed_components: bool = True  # copy the frozen parts into the output bundle (runs offline)


@dataclass(frozen=True)
class DataSection:
    root: str = ""  # a directory in the shapes-world / COCO layout
    split: str = "train"
    captions: str = "captions_{split}.json"  # COCO captions (a `quality` field is used in stage 2 when present)
    questions: str = "questions_{split}.json"  # VQAv2 questions
    answers: str = "annotations_vqa_{split}.json"  # VQAv2 annotations
    instances: str = "instances_{split}.json"  # COCO instances, for detection sequences
    images: str = "images/{split}"
    # WebDataset tar shards under root (a glob or {000000..000009} braces, with {split}), read instead of
    # the JSON files when set: e.g. "shards/{split}-*.tar" (what `qbridge data shapes` writes)
    shards: str = ""
    tasks: dict = field(default_factory=lambda: {"caption": 1.0})  # stage 2 task mixture weights
    # stage 2, optional: per image, a text the frozen LLM reads well as its context (JSON
    # {"contexts": [{"image_id", "text"}]}, e.g. "contexts_{split}.json"); with run.context_weight > 0 the
    # queries learn to write its token embeddings, slot by slot (training.losses.context_loss)
    contexts: str = ""
    max_text_tokens: int = 64


@dataclass(frozen=True)
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.98)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    loc_lr_scale: float = 1.0  # stage 2: learning-rate multiplier for the location-token rows


@dataclass(frozen=True)
class RunSection:
    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    save_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mixed_precision: str = "auto"  # "auto" = bf16 where the device supports it, else fp32; "no"; "bf16"
    feature_cache: str = ""  # directory of cached frozen vision features ("" = encode every step)
    itc_label_smoothing: float = 0.1
    itg_label_smoothing: float = 0.1
    context_weight: float = 0.0  # stage 2: weight of the context-distillation loss (needs data.contexts)
    context_temperature: float = 0.02
    # stage 2: the first N steps train the queries on the context-distillation loss alone, without the LLM's
    # forward (about a quarter of a full step's time; on the demo, 1500 such steps from stage 1 wrote box
    # numbers better than 3000 full steps did: 0.24 against 0.16 exact)
    context_only_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """What a stage needs; the docstring of each config file names the command that runs it."""

    stage: str = "stage1"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        sections = {"model": ModelSection, "data": DataSection, "optim": OptimSection, "run": RunSection}
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config sections: {sorted(unknown)}")
        kwargs = {}
        for name, value in d.items():
            if name in sections:
                fields = {f.name for f in dataclasses.fields(sections[name])}
                bad = set(value) - fields
                if bad:
                    raise ValueError(f"unknown fields in '{name}': {sorted(bad)}")
                if "betas" in value:
                    value = dict(value, betas=tuple(value["betas"]))
                kwargs[name] = sections[name](**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A JSON config file plus `section.field=value` overrides (values parsed as JSON, else strings)."""
    d = json.loads(Path(path).read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not section.field=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        target = d
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target[parts[-1]] = _parse_value(value)
    return TrainConfig.from_dict(d)
