"""transformers' Llama forward, written out over the same weights for our decode loop.

On small models a decode step costs module calls, not arithmetic: `LlamaForCausalLM.forward` runs ~15
Python modules a layer, its mask and cache bookkeeping, and its output dataclasses, where a step needs
~12 tensor ops a layer. `LlamaStep` runs those ops alone, on the decoder's `SlotCache`, and returns the
last position's logits. It is the same arithmetic in the same order (RMSNorm in fp32, rotary embedding
by `rotate_half`, SDPA attention with grouped KV heads, SiLU-gated MLP), so greedy tokens equal
transformers' (tests/test_decode_loop.py runs the Llama decoder both ways).

`unsupported` says why a model takes the plain forward instead: another architecture, or a Llama
feature this file does not write out (runtime-dynamic RoPE, `pretraining_tp`, sliding windows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# RoPE variants whose frequencies transformers computes once, into `rotary_emb.inv_freq` and
# `attention_scaling`; "dynamic" and "longrope" recompute them from the sequence length at run time.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(llm) -> str | None:
    """None when `LlamaStep` can run `llm`, else the reason it cannot."""
    cfg = llm.config.get_text_config()
    if cfg.model_type != "llama":
        return f"model_type {cfg.model_type!r} is not llama"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1"
    if cfg.hidden_act != "silu":
        return f"hidden_act {cfg.hidden_act!r}"
    rope = getattr(llm.model.rotary_emb, "rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"rope_type {rope!r} is computed at run time"
    for layer in llm.model.layers:
        for linear in (*_attention(layer), *_mlp(layer)):
            # exactly nn.Linear: a quantised subclass (bitsandbytes) or an offloaded weight is not a plain matmul
            if type(linear) is not torch.nn.Linear or linear.weight.device.type == "meta":
                return f"{type(linear).__name__} layers are not plain nn.Linear"
    return None


def _attention(layer) -> tuple:
    a = layer.self_attn
    return a.q_proj, a.k_proj, a.v_proj


def _mlp(layer) -> tuple:
    return layer.mlp.gate_proj, layer.mlp.up_proj


class LlamaStep:
    """`LlamaForCausalLM(inputs_embeds, mask, positions, cache)[..., -1, :]` as plain tensor ops.

    The q/k/v projections and the gate/up projections run as one matmul each: their weights are moved
    into one tensor per layer, and the modules' parameters become views of it (no extra memory, and the
    model's own forward still works on them).
    """

    def __init__(self, llm, max_positions: int = 256):
        """`max_positions`: positions 0 .. max_positions - 1 can be run (the rotary tables' length)."""
        reason = unsupported(llm)
        if reason:
            raise ValueError(f"LlamaStep cannot run this model: {reason}")
        cfg = llm.config.get_text_config()
        model = llm.model
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.layers = [(
            layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, *_fuse(_attention(layer)),
            layer.self_attn.o_proj, layer.post_attention_layernorm.weight,
            layer.post_attention_layernorm.variance_epsilon, *_fuse(_mlp(layer)), layer.mlp.down_proj,
        ) for layer in model.layers]
        self.norm, self.norm_eps = model.norm.weight, model.norm.variance_epsilon
        self.lm_head = llm.lm_head
        self.cos, self.sin = _rotary_tables(model.rotary_emb, max_positions, next(llm.parameters()).dtype)

    def __call__(self, x: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor, cache) -> torch.Tensor:
        """`x` (m, q, D) at `positions` (m, q); `mask` (m, 1, q, w) bool, True where a query sees a key, or
        None when every query sees the whole window; `cache`: the decoder's SlotCache with its rows, columns
        and window set. Returns (m, V) fp32 logits."""
        m, q, _ = x.shape
        heads, kv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (m, 1, q, hd)
        h = x
        for i, (w_in, eps_in, qkv, qkv_bias, wo, w_post, eps_post, gate_up, gate_up_bias, down) in enumerate(self.layers):
            r = _rms_norm(h, w_in, eps_in)
            heads_qkv = F.linear(r, qkv, qkv_bias).view(m, q, heads + 2 * kv, hd).transpose(1, 2)
            qk = _rope(heads_qkv[:, : heads + kv], cos, sin)  # q and k rotate together
            keys, values = cache.layers[i].update(qk[:, heads:], heads_qkv[:, heads + kv:])
            a = F.scaled_dot_product_attention(qk[:, :heads], keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=heads != kv)
            h = h + F.linear(a.transpose(1, 2).reshape(m, q, heads * hd), wo.weight, wo.bias)
            g, u = F.linear(_rms_norm(h, w_post, eps_post), gate_up, gate_up_bias).chunk(2, dim=-1)
            h = h + F.linear(F.silu(g) * u, down.weight, down.bias)
        last = _rms_norm(h[:, -1], self.norm, self.norm_eps)
        return self.lm_head(last).float()  # a module: the bridge may extend the head with location rows


@torch.no_grad()
def _fuse(linears: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (sum of outs, in) weight for `linears` (and one bias, or None); each module's weight (and bias)
    becomes a view of its rows, so the fused copy is the only copy."""
    weight = torch.cat([lin.weight for lin in linears])
    biases = [lin.bias for lin in linears]
    bias = torch.cat(biases) if all(b is not None for b in biases) else None
    if any(b is not None for b in biases) and bias is None:
        bias = torch.cat([b if b is not None else lin.weight.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight.data = weight[row: row + n]
        if lin.bias is not None:
            lin.bias.data = bias[row: row + n]
        row += n
    return weight, bias


def _rotary_tables(rotary, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, head_dim) of positions 0 .. n - 1, as transformers' rotary embedding computes them per
    call (fp32 angles, `attention_scaling`, then the model's dtype); sin's first half negated (`_rope`)."""
    inv_freq = rotary.inv_freq.float()
    freqs = torch.arange(n, device=inv_freq.device).float()[:, None] * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = (angles.cos() * rotary.attention_scaling).to(dtype)
    sin = (angles.sin() * rotary.attention_scaling).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # rotate_half's sign, moved here


def _rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalise in fp32, scale in the weight's dtype."""
    x = h.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(h.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' `x * cos + rotate_half(x) * sin`, with rotate_half's minus in `signed_sin`'s first half:
    the same products, in fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
