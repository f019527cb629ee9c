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

from qformer.bridge import Bridge, left_align


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
    device = vision_feats.device
    enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    q = torch.tensor(quality, device=device) if quality is not None else None
    inputs = bridge.build_llm_inputs(
        bridge.project_queries(vision_feats), enc.input_ids.to(device), enc.attention_mask.to(device), q
    )
    inputs = left_align(inputs)

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
    return [_finish(tokenizer, sequences[i], logprobs[i], eos, pad, config) for i in range(sequences.shape[0])]


def _finish(tokenizer, ids: torch.Tensor, logprobs: torch.Tensor, eos: int | None, pad: int | None, config) -> Generated:
    ids_l = ids.tolist()
    finish = "length"
    if eos is not None and eos in ids_l:
        ids_l, finish = ids_l[: ids_l.index(eos)], "stop"

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True)

    text = decode(ids_l)
    hits = [text.find(s) for s in config.stop if s in text]
    if hits:
        cut, finish = min(hits), "stop"
        keep = 0  # the tokens whose text ends before the stop string starts
        while keep < len(ids_l) and len(decode(ids_l[: keep + 1])) <= cut:
            keep += 1
        ids_l, text = ids_l[:keep], text[:cut]
    return Generated(
        text=text.strip(),
        token_ids=ids_l,
        logprobs=logprobs[: len(ids_l)].tolist(),
        finish_reason=finish,
        tokens=[tokenizer.decode([t]) for t in ids_l],
    )
