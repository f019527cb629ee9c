"""Configs: one frozen, JSON round-trippable dataclass per component."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qformer.prompts import DEFAULT_PROMPTS, TaskPrompts


@dataclass(frozen=True)
class QFormerConfig:
    # BERT-base sizes are BLIP-2's; tests use tiny odd sizes.
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"  # exact GELU, as BERT and BLIP-2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    cross_attention_every: int = 2  # BLIP-2 cross-attends in layers 0, 2, 4, ...
    encoder_hidden_size: int = 1408  # width of the vision features the queries read
    num_query_tokens: int = 32
    # Stage-2 checkpoints (and transformers' Blip2ForConditionalGeneration) drop the text branch:
    # word/position embeddings, the text FFN and the ITC/ITM/LM heads. Stage 1 needs it.
    with_text: bool = True
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    embed_dim: int = 256  # shared ITC space
    temperature_init: float = 0.07

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_every == 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        from transformers.activations import ACT2FN

        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not an activation transformers knows: "
                             f"{sorted(ACT2FN)}")


@dataclass(frozen=True)
class ComponentRef:
    """Where a frozen component lives: embedded in the bundle, or referenced by hub id / path."""

    source: str  # "embedded" | "reference"
    path: str  # sub-directory of the bundle when embedded; hub id or path when referenced
    sha256: str | None = None  # content hash of the weights files, checked on load when referenced


@dataclass(frozen=True)
class BridgeConfig:
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    vision: ComponentRef = field(default_factory=lambda: ComponentRef("embedded", "vision"))
    llm: ComponentRef = field(default_factory=lambda: ComponentRef("embedded", "llm"))
    vision_hidden_size: int = 1408
    llm_hidden_size: int = 2560
    vision_layer_norm_eps: float = 1e-5
    num_quality_levels: int = 0  # K soft-prompt levels; 0 = no quality conditioning
    quality_prompt_len: int = 4  # soft vectors per level
    quality_names: tuple[str, ...] = ()  # optional names for the levels, lowest first
    num_loc_bins: int = 0  # <loc_i> tokens added to the LLM tokenizer; 0 = no detection
    base_vocab_size: int = 0  # LLM vocabulary before the location tokens were added
    image_token_index: int | None = None  # kept from a transformers BLIP-2 checkpoint for export
    llm_quantization: str | None = None  # None | "8bit" | "4bit" (bitsandbytes, for the frozen LLM)
    # A second, frozen ln_vision + Q-Former with its text branch: stage 1's, kept as stage 1 left it, for ITC and
    # ITM (retrieval, alignment scores), while the Q-Former that feeds the LLM (then without a text branch, as
    # in BLIP-2's stage 2) is trained on. Without it, stage 2 moves the encoder layers the text branch shares.
    alignment_qformer: bool = False
    # The stage-1 copy's own Q-Former config when its shape differs from the trained Q-Former's (None: the
    # same, with the text branch): stage 2 may use more queries (one per token of the context it learns to
    # write, training.losses.context_loss), more layers or cross-attention in every layer.
    alignment_qformer_config: QFormerConfig | None = None
    # The words the LLM was trained to read for each task; bundles without them predate them and used these.
    prompts: TaskPrompts = DEFAULT_PROMPTS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BridgeConfig":
        d = dict(d)
        legacy_queries = d.pop("alignment_query_tokens", 0)  # bundles before alignment_qformer_config
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown bridge config fields: {sorted(unknown)}")
        d["qformer"] = QFormerConfig(**d.get("qformer", {}))
        if d.get("alignment_qformer_config") is not None:
            d["alignment_qformer_config"] = QFormerConfig(**d["alignment_qformer_config"])
        elif legacy_queries:
            d["alignment_qformer_config"] = dataclasses.replace(d["qformer"], with_text=True,
                                                                num_query_tokens=legacy_queries)
        d["vision"] = ComponentRef(**d["vision"]) if "vision" in d else ComponentRef("embedded", "vision")
        d["llm"] = ComponentRef(**d["llm"]) if "llm" in d else ComponentRef("embedded", "llm")
        d["quality_names"] = tuple(d.get("quality_names", ()))
        d["prompts"] = TaskPrompts(**d["prompts"]) if "prompts" in d else DEFAULT_PROMPTS
        return cls(**d)

    def stage1_qformer(self) -> QFormerConfig:
        """The frozen stage-1 copy's Q-Former config: ``alignment_qformer_config``, or else the trained one's
        with its text branch."""
        return self.alignment_qformer_config or dataclasses.replace(self.qformer, with_text=True)

    def replace(self, **changes: Any) -> "BridgeConfig":
        return dataclasses.replace(self, **changes)

    def quality_name(self, level: int) -> str:
        """Level ``level``'s name (``quality_names``), or its number when it has none: the one naming
        that evaluation reports, the service answers and ``/v1/models`` lists."""
        return self.quality_names[level] if level < len(self.quality_names) else str(level)

    def quality_level(self, level: int | str) -> int:
        """A level number or name -> index in 0..K-1."""
        if self.num_quality_levels == 0:
            raise ValueError("this model has no quality levels")
        if isinstance(level, str) and not level.lstrip("-").isdigit():
            if level not in self.quality_names:
                raise ValueError(f"unknown quality level {level!r}; known: {list(self.quality_names)}")
            return self.quality_names.index(level)
        idx = int(level)
        if not 0 <= idx < self.num_quality_levels:
            raise ValueError(f"quality level {idx} out of range 0..{self.num_quality_levels - 1}")
        return idx
