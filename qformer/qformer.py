"""The Q-Former: learned queries reading frozen image features through BERT-style layers.

State-dict names follow transformers' `Blip2QFormerModel` (`layernorm`, `encoder.layer.{i}...`) where
the piece is the same; the text branch (`embeddings`, text FFN, heads) exists only with `with_text`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from qformer.config import QFormerConfig


class AttentionMode(enum.Enum):
    QUERIES = "queries"  # image -> query embeddings (ITC image side, the LLM bridge)
    TEXT = "text"  # unimodal text encoder (ITC text side, [CLS] feature)
    BIDIRECTIONAL = "bidirectional"  # [queries; text] see each other (ITM)
    CAUSAL = "causal"  # queries see queries; text t sees all queries and text <= t (ITG)


def build_attention_mask(
    mode: AttentionMode, num_queries: int, text_mask: torch.Tensor | None, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask, True where row position may attend to column position.

    L = num_queries + T for the joint modes, num_queries for QUERIES, T for TEXT. `text_mask` (B, T) marks
    real text tokens (1) and padding (0); padding columns are never attended to.
    """
    if mode is AttentionMode.QUERIES:
        return torch.ones(1, 1, num_queries, num_queries, dtype=torch.bool, device=device)
    if text_mask is None:
        raise ValueError(f"mode {mode.value} needs a text mask")
    text_mask = text_mask.bool()
    B, T = text_mask.shape
    device = text_mask.device
    if mode is AttentionMode.TEXT:
        return text_mask[:, None, None, :].expand(B, 1, T, T)
    Q = num_queries
    cols = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), text_mask], dim=1)  # (B, L)
    allowed = cols[:, None, None, :].expand(B, 1, Q + T, Q + T).clone()
    if mode is AttentionMode.CAUSAL:
        causal = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
        causal[:Q, Q:] = False  # queries never see text
        causal[Q:, Q:] = torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
        allowed &= causal
    return allowed


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # A large finite negative rather than -inf: a fully masked row then stays finite (uniform).
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_probs_dropout_prob
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_size, cfg.hidden_size)
        self.value = nn.Linear(kv_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        S = kv.shape[1]
        q = self.query(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, L, hd)
        k = self.key(kv).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        v = self.value(kv).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, S, hd)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, L, hd)
        return out.transpose(1, 2).reshape(B, L, -1)


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(x + Dropout(Dense(h)))."""

    def __init__(self, cfg: QFormerConfig, in_size: int):
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.attention = MultiHeadAttention(cfg, kv_size)
        self.output = AddNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.attention(x, kv, mask), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        self.has_cross_attention = cfg.has_cross_attention(index)
        if self.has_cross_attention:
            self.crossattention = Attention(cfg, cfg.encoder_hidden_size)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = AddNorm(cfg, cfg.intermediate_size)
        if cfg.with_text:
            self.intermediate = Intermediate(cfg)
            self.output = AddNorm(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        num_queries: int,
        image: torch.Tensor | None,
        image_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        h = self.attention(x, x, mask)
        parts = []
        if num_queries:
            q = h[:, :num_queries]
            if self.has_cross_attention:
                if image is None:
                    raise ValueError("cross-attention layers need image features")
                q = self.crossattention(q, image, image_mask)
            parts.append(self.output_query(self.intermediate_query(q), q))
        if h.shape[1] > num_queries:
            t = h[:, num_queries:]
            parts.append(self.output(self.intermediate(t), t))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


class Encoder(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_hidden_layers))


class TextEmbeddings(nn.Module):
    """Word + absolute position embeddings for text; queries get no position embedding."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]


class LMHead(nn.Module):
    """BERT MLM head; the decoder weight is tied to the word embeddings."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.act = ACT2FN[cfg.hidden_act]  # BERT's prediction-head transform uses the config's activation

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.LayerNorm(self.act(self.dense(h))), word_embeddings, self.bias)


@dataclass
class QFormerOutput:
    query_output: torch.Tensor | None  # (B, Q, H)
    text_output: torch.Tensor | None  # (B, T, H)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = Encoder(cfg)
        if cfg.with_text:
            self.embeddings = TextEmbeddings(cfg)
            self.vision_projection = nn.Linear(cfg.hidden_size, cfg.embed_dim)
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.embed_dim)
            self.itm_head = nn.Linear(cfg.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(cfg.temperature_init))
            self.lm_head = LMHead(cfg)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(
        self,
        mode: AttentionMode,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> QFormerOutput:
        """image_embeds (B, N, Dv) after the vision LayerNorm; input_ids/attention_mask (B, T) for text modes."""
        uses_queries = mode is not AttentionMode.TEXT
        uses_text = mode is not AttentionMode.QUERIES
        if uses_text and not self.cfg.with_text:
            raise ValueError(f"mode {mode.value} needs the text branch (with_text=False)")
        if uses_text and input_ids is None:
            raise ValueError(f"mode {mode.value} needs input_ids")
        if uses_queries and image_embeds is None:
            raise ValueError(f"mode {mode.value} needs image_embeds")

        parts = []
        if uses_queries:
            B = image_embeds.shape[0]
            parts.append(self.query_tokens.expand(B, -1, -1).to(image_embeds.dtype))
        if uses_text:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            parts.append(self.embeddings(input_ids))
        x = self.dropout(self.layernorm(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]))

        Q = self.cfg.num_query_tokens if uses_queries else 0
        mask = _additive(build_attention_mask(mode, Q, attention_mask, x.device), x.dtype)
        img_mask = None
        if image_mask is not None:
            img_mask = _additive(image_mask.bool()[:, None, None, :], x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, Q, image_embeds, img_mask)
        return QFormerOutput(
            query_output=x[:, :Q] if uses_queries else None,
            text_output=x[:, Q:] if uses_text else None,
        )

    # Heads. Each takes Q-Former outputs, so losses live outside the model.
    def image_features(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) -> L2-normalised (B, Q, E) in the shared ITC space."""
        return F.normalize(self.vision_projection(query_output), dim=-1)

    def text_features(self, text_output: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> L2-normalised [CLS] feature (B, E)."""
        return F.normalize(self.text_projection(text_output[:, 0]), dim=-1)

    def itm_logits(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) from a BIDIRECTIONAL pass -> (B, 2), averaged over the queries."""
        return self.itm_head(query_output).mean(dim=1)

    def lm_logits(self, text_output: torch.Tensor) -> torch.Tensor:
        """(B, T, H) from a CAUSAL pass -> (B, T, vocab)."""
        return self.lm_head(text_output, self.embeddings.word_embeddings.weight)

    def similarity(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """Max over queries of the cosine similarity: (Bi, Q, E) x (Bt, E) -> (Bi, Bt), not divided by temp."""
        return torch.einsum("iqe,te->itq", image_feats, text_feats).amax(dim=-1)


def num_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

