"""The bridge: frozen vision encoder -> LayerNorm -> Q-Former -> Linear -> frozen causal LLM.

The LLM input is `[quality prompt][projected queries][task prompt + text]`. Location tokens `<loc_i>` are
appended to the LLM vocabulary; only their input and output rows train (`loc_embeddings`, `loc_head`),
the rest of the LLM stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel

from qformer.config import BridgeConfig
from qformer.qformer import AttentionMode, QFormer

# transformers model types -> the class that loads only the vision tower from a full checkpoint.
_VISION_CLASSES = {
    "blip-2": "Blip2VisionModel",
    "blip_2_vision_model": "Blip2VisionModel",
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
    "dinov2": "Dinov2Model",
    "resnet": "ResNetModel",
    "convnext": "ConvNextModel",
}


def load_vision_encoder(name_or_path: str, **kwargs) -> PreTrainedModel:
    """A frozen vision tower from a hub id or a directory, safetensors only.

    BLIP-2's `post_layernorm` *is* BLIP-2's trainable `ln_vision`, so for that tower it is replaced by an
    identity here and its weights live in the bridge's `ln_vision` (see `hf_interop`).
    """
    import transformers

    model_type = AutoConfig.from_pretrained(name_or_path).model_type
    cls_name = _VISION_CLASSES.get(model_type)
    cls = getattr(transformers, cls_name) if cls_name else AutoModel
    model = cls.from_pretrained(name_or_path, use_safetensors=True, **kwargs)
    return strip_blip2_post_layernorm(model)


def strip_blip2_post_layernorm(model: PreTrainedModel) -> PreTrainedModel:
    if type(model).__name__ == "Blip2VisionModel" and not isinstance(model.post_layernorm, nn.Identity):
        model.post_layernorm = nn.Identity()
    return model


def load_llm(name_or_path: str, quantization: str | None = None, **kwargs) -> PreTrainedModel:
    """A frozen causal LM, optionally 8-bit / 4-bit through bitsandbytes (needs a CUDA GPU)."""
    if quantization:
        from transformers import BitsAndBytesConfig

        if quantization not in ("8bit", "4bit"):
            raise ValueError(f"quantization must be '8bit' or '4bit', not {quantization!r}")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit"
        )
    return AutoModelForCausalLM.from_pretrained(name_or_path, use_safetensors=True, **kwargs)


def vision_hidden_size(model: PreTrainedModel) -> int:
    """Width of the tower's output tokens: a ViT's hidden size, a conv net's last stage's channels."""
    c = model.config
    return c.hidden_sizes[-1] if getattr(c, "hidden_sizes", None) else c.hidden_size


def position_embedding_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(height * width, dim) fixed sine-cosine embedding of grid cells in row-major order (MAE's 2-D variant):
    the first half of the channels encodes the row, the second half the column."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine position embedding needs a width divisible by 4, not {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # (dim/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.double()[:, None] * freq[None]  # (N, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, dim/2)

    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def feature_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """A tower's last hidden state as tokens: (B, N, D) as it is; a conv map (B, C, H, W) becomes H*W tokens
    (row-major) with a fixed 2-D position embedding added, so that the queries can tell where things are."""
    if hidden.dim() == 3:
        return hidden
    B, C, H, W = hidden.shape
    tokens = hidden.flatten(2).transpose(1, 2)  # (B, H*W, C)
    return tokens + position_embedding_2d(H, W, C).to(tokens)


class ExtendedEmbedding(nn.Module):
    """A frozen embedding table plus trainable rows for ids >= the base vocabulary."""

    def __init__(self, base: nn.Embedding, extra: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra = extra

    @property
    def weight(self) -> torch.Tensor:  # for callers that read the table (e.g. resize checks)
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)], dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        V = self.base.num_embeddings
        is_new = ids >= V
        out = self.base(ids.clamp(max=V - 1))
        if is_new.any():
            new = F.embedding((ids - V).clamp(min=0), self.extra).to(out.dtype)
            out = torch.where(is_new[..., None], new, out)
        return out


class ExtendedLMHead(nn.Module):
    """A frozen output projection plus trainable output rows for the new tokens."""

    def __init__(self, base: nn.Module, extra: nn.Parameter):
        super().__init__()
        self.base = base
        self.extra = extra

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)], dim=0)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(h), F.linear(h, self.extra.to(h.dtype))], dim=-1)


@dataclass
class LLMInputs:
    inputs_embeds: torch.Tensor  # (B, P + T, D)
    attention_mask: torch.Tensor  # (B, P + T)
    prefix_len: int  # P = quality prompt + queries


@dataclass
class BridgeOutput:
    logits: torch.Tensor  # (B, T, V): LLM logits at the text positions (position t predicts token t + 1)


class Alignment(nn.Module):
    """Stage 1's ln_vision + Q-Former (text branch included), frozen: the bridge's ITC/ITM side when its own
    Q-Former was trained on in stage 2 (``BridgeConfig.alignment_qformer``). BLIP-2 serves retrieval from
    its stage-1 checkpoint for the same reason."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.ln_vision = nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_layer_norm_eps)
        self.qformer = QFormer(cfg.stage1_qformer())
        self.requires_grad_(False)

    def query_output(self, vision_feats: torch.Tensor) -> torch.Tensor:
        return _query_output(self.ln_vision, self.qformer, vision_feats)


def _query_output(ln_vision: nn.LayerNorm, qformer: QFormer, vision_feats: torch.Tensor) -> torch.Tensor:
    """(B, N, Dv) frozen features -> Q-Former query states (B, Q, H)."""
    image = ln_vision(vision_feats.to(ln_vision.weight.dtype))
    return qformer(AttentionMode.QUERIES, image_embeds=image).query_output


class Bridge(nn.Module):
    def __init__(self, cfg: BridgeConfig, vision: PreTrainedModel, llm: PreTrainedModel | None):
        super().__init__()
        if cfg.qformer.encoder_hidden_size != cfg.vision_hidden_size:
            raise ValueError(
                f"Q-Former encoder_hidden_size {cfg.qformer.encoder_hidden_size} != vision width {cfg.vision_hidden_size}"
            )
        self.cfg = cfg
        self.vision = strip_blip2_post_layernorm(vision)
        self.ln_vision = nn.LayerNorm(cfg.vision_hidden_size, eps=cfg.vision_layer_norm_eps)
        self.qformer = QFormer(cfg.qformer)
        self.alignment = Alignment(cfg) if cfg.alignment_qformer else None
        self.language_projection = nn.Linear(cfg.qformer.hidden_size, cfg.llm_hidden_size)
        self.quality_prompts = (
            nn.Parameter(torch.randn(cfg.num_quality_levels, cfg.quality_prompt_len, cfg.llm_hidden_size) * 0.02)
            if cfg.num_quality_levels
            else None
        )
        self.loc_embeddings = self.loc_head = None
        self.llm = llm
        for frozen in (self.vision, self.llm):
            if frozen is not None:
                frozen.requires_grad_(False)
                frozen.eval()
        if llm is not None and cfg.num_loc_bins:
            self._add_location_rows(cfg.num_loc_bins)

    def _add_location_rows(self, n: int) -> None:
        emb = self.llm.get_input_embeddings()
        head = self.llm.get_output_embeddings()
        if emb.num_embeddings != self.cfg.base_vocab_size:
            raise ValueError(
                f"LLM vocabulary is {emb.num_embeddings}, the bundle expects {self.cfg.base_vocab_size} before location tokens"
            )
        # New rows start at the mean of the existing ones, a neutral point in the LLM's embedding space.
        self.loc_embeddings = nn.Parameter(emb.weight.detach().float().mean(0, keepdim=True).repeat(n, 1))
        self.loc_head = nn.Parameter(head.weight.detach().float().mean(0, keepdim=True).repeat(n, 1))
        self.llm.set_input_embeddings(ExtendedEmbedding(emb, self.loc_embeddings))
        self.llm.set_output_embeddings(ExtendedLMHead(head, self.loc_head))
        self.llm.config.get_text_config().vocab_size = emb.num_embeddings + n

    def train(self, mode: bool = True) -> "Bridge":
        super().train(mode)
        for frozen in (self.vision, self.llm, self.alignment):  # frozen parts stay in eval mode (no dropout)
            if frozen is not None:
                frozen.eval()
        return self

    # The trainable parts are what a bundle's model.safetensors holds.
    TRAINABLE = ("ln_vision", "qformer", "language_projection", "quality_prompts", "loc_embeddings", "loc_head",
                 "alignment")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            k: v
            for k, v in self.state_dict().items()
            if k.split(".")[0] in self.TRAINABLE and not k.startswith(("vision.", "llm."))
        }

    def serving_layout(self) -> "Bridge":
        """Lay a conv tower's weights out channels-last (NHWC), oneDNN's own layout: the same arithmetic up to
        float rounding (≤ 2e-5 on the demo's features); on the 2-core CPU the demo's tower took 9.0 against 11.8 ms
        an image in batches of 16. For serving and benchmarks: bundles are saved from the standard layout."""
        if getattr(self.vision.config, "hidden_sizes", None):  # a conv net (see vision_hidden_size)
            self.vision.to(memory_format=torch.channels_last)
        return self

    # Forward pieces. No tokenisation and no losses in here.
    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision features (B, N, Dv), before the trainable LayerNorm (cacheable)."""
        dtype = next(self.vision.parameters()).dtype
        return feature_tokens(self.vision(pixel_values=pixel_values.to(dtype)).last_hidden_state)

    def query_output(self, vision_feats: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) frozen features -> Q-Former query states (B, Q, H)."""
        return _query_output(self.ln_vision, self.qformer, vision_feats)

    @property
    def aligner(self) -> "Alignment | Bridge":
        """What ITC and ITM run through: ``.qformer`` (text branch included) and ``.query_output``. The
        stage-1 copy when the bridge carries one, else the bridge itself."""
        return self.alignment if self.alignment is not None else self

    def project_queries(self, vision_feats: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) -> soft LLM inputs (B, Q, D)."""
        return self.language_projection(self.query_output(vision_feats))

    def base_input_embeddings(self) -> torch.Tensor:
        """The frozen LLM's own input table (V, D), without the location rows."""
        emb = self.llm.get_input_embeddings()
        return emb.base.weight if isinstance(emb, ExtendedEmbedding) else emb.weight

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def build_llm_inputs(
        self,
        query_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        quality: torch.Tensor | None = None,
    ) -> LLMInputs:
        """`[quality prompt][queries][text]` in that order; text padding stays where the caller put it."""
        B = input_ids.shape[0]
        text = self.embed_tokens(input_ids)
        parts = [query_embeds.to(text.dtype)]
        if quality is not None:
            if self.quality_prompts is None:
                raise ValueError("this model has no quality levels")
            parts.insert(0, self.quality_prompts[quality].to(text.dtype))  # (B, P, D)
        prefix = torch.cat(parts, dim=1)
        ones = torch.ones(B, prefix.shape[1], dtype=attention_mask.dtype, device=attention_mask.device)
        return LLMInputs(
            inputs_embeds=torch.cat([prefix, text], dim=1),
            attention_mask=torch.cat([ones, attention_mask], dim=1),
            prefix_len=prefix.shape[1],
        )

    def forward(
        self,
        vision_feats: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        quality: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
    ) -> BridgeOutput:
        """Teacher-forced pass over right-padded text; logits at the text positions. ``query_embeds``: the
        projected queries of ``vision_feats`` when the caller has them already."""
        if query_embeds is None:
            query_embeds = self.project_queries(vision_feats)
        inputs = self.build_llm_inputs(query_embeds, input_ids, attention_mask, quality)
        out = self.llm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, use_cache=False)
        return BridgeOutput(logits=out.logits[:, inputs.prefix_len :])


def left_align(inputs: LLMInputs) -> LLMInputs:
    """Move every row's padding to the front (stable), the layout batched decoding needs."""
    order = torch.argsort(inputs.attention_mask, dim=1, stable=True)  # zeros (padding) first
    embeds = torch.gather(inputs.inputs_embeds, 1, order[..., None].expand_as(inputs.inputs_embeds))
    return LLMInputs(embeds, torch.gather(inputs.attention_mask, 1, order), inputs.prefix_len)
