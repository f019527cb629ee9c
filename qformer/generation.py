"""Batched generation through the frozen LLM: greedy, beam or sampling, KV cache, stop strings.

Prompts are left-padded, `[quality][queries][prompt]` rows are left-aligned, and transformers'
`generate` decodes with its KV cache. Each result carries the text, the token ids and the per-token
log-probabilities (of the raw model distribution for greedy and sampling; the beam's step scores for beam
search), which the box codec turns into per-box scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from qformer.bridge import Bridge, LLMInputs, left_align


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 30
    strategy: str = "greedy"  # "greedy" | "beam" | "sample"
    num_beams: int = 3  # beam only
    temperature: float = 1.0  # sample only
    top_p: float = 1.0  # sample only
    top_k: int = 0  # sample only; 0 = off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings: generation ends after one appears; it is cut from the text
    seed: int | None = None  # sample only: a fixed seed makes sampling reproducible

    def __post_init__(self) -> None:
        if self.strategy not in ("greedy", "beam", "sample"):
            raise ValueError(f"strategy must be greedy, beam or sample, not {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Generated:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    tokens: list[str] = field(default_factory=list)  # each token decoded on its own


@torch.no_grad()
def generate(
    bridge: Bridge,
    tokenizer: PreTrainedTokenizerBase,
    vision_feats: torch.Tensor,
    prompts: list[str],
    quality: list[int] | None = None,
    config: GenerationConfig = GenerationConfig(),
) -> list[Generated]:
    """One result per row of `vision_feats` (B, N, Dv) and `prompts` (B strings)."""
    if len(prompts) != vision_feats.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {vision_feats.shape[0]} images")
    return generate_from_queries(bridge, tokenizer, bridge.project_queries(vision_feats), prompts, quality, config)


@torch.no_grad()
def prepare_inputs(
    bridge: Bridge,
    tokenizer: PreTrainedTokenizerBase,
    query_embeds: torch.Tensor,
    prompts: list[str],
    quality: list[int] | None = None,
) -> LLMInputs:
    """Left-aligned `[pad][quality][queries][BOS prompt]` rows from projected queries (B, Q, D)."""
    device = query_embeds.device
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    q = torch.tensor(quality, device=device) if quality is not None else None
    inputs = bridge.build_llm_inputs(query_embeds, enc.input_ids.to(device), enc.attention_mask.to(device), q)
    return left_align(inputs)


def row_embeddings(inputs: LLMInputs) -> list[torch.Tensor]:
    """Each row's embeddings without its padding (L_i, D): what an engine fed with prompt embeddings needs."""
    return [e[m.bool()] for e, m in zip(inputs.inputs_embeds, inputs.attention_mask)]


@torch.no_grad()
def generate_from_queries(
    bridge: Bridge,
    tokenizer: PreTrainedTokenizerBase,
    query_embeds: torch.Tensor,
    prompts: list[str],
    quality: list[int] | None = None,
    config: GenerationConfig = GenerationConfig(),
) -> list[Generated]:
    """Generation from already projected queries (B, Q, D), e.g. from a cache of encoded images."""
    if len(prompts) != query_embeds.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {query_embeds.shape[0]} images")
    inputs = prepare_inputs(bridge, tokenizer, query_embeds, prompts, quality)

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    kwargs = dict(
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        repetition_penalty=config.repetition_penalty,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        use_cache=True,
    )
    if config.stop:
        kwargs.update(stop_strings=list(config.stop), tokenizer=tokenizer)
    if config.strategy == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif config.strategy == "beam":
        kwargs.update(do_sample=False, num_beams=config.num_beams, early_stopping=True)
    else:
        kwargs.update(do_sample=True, num_beams=1, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        if config.seed is not None:
            torch.manual_seed(config.seed)

    out = bridge.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **kwargs)
    sequences = out.sequences  # (B, new): only the generated tokens when decoding from embeddings
    if config.strategy == "beam":
        logprobs = bridge.llm.compute_transition_scores(sequences, out.scores, out.beam_indices, normalize_logits=False)
    else:
        steps = torch.stack(out.logits, dim=1).float().log_softmax(-1)  # (B, new, V)
        logprobs = steps.gather(-1, sequences[:, : steps.shape[1], None]).squeeze(-1)
    return [finish(tokenizer, sequences[i].tolist(), logprobs[i].tolist(), config) for i in range(sequences.shape[0])]


def finish(tokenizer, ids: list[int], logprobs: list[float], config: GenerationConfig) -> Generated:
    """Cut a generated row at EOS and at the first stop string; decode text and per-token pieces."""
    eos = tokenizer.eos_token_id
    finish_reason = "length"
    if eos is not None and eos in ids:
        ids, finish_reason = ids[: ids.index(eos)], "stop"

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True)

    text = decode(ids)
    hits = [text.find(s) for s in config.stop if s in text]
    if hits:
        cut, finish_reason = min(hits), "stop"
        keep = 0  # the tokens whose text ends before the stop string starts
        while keep < len(ids) and len(decode(ids[: keep + 1])) <= cut:
            keep += 1
        ids, text = ids[:keep], text[:cut]
    return Generated(
        text=text.strip(),
        token_ids=ids,
        logprobs=list(logprobs[: len(ids)]),
        finish_reason=finish_reason,
        tokens=[tokenizer.decode([t]) for t in ids],
    )
