"""Batched generation through the frozen LLM: greedy, beam or sampling, KV cache, stop strings.

Prompts are left-padded and `[quality][queries][prompt]` rows are left-aligned. Two decoders give the
same rows: `generate_from_queries` calls transformers' `generate`; `decode_from_queries` runs our own
`Decoder` (prefill, then one step at a time over a preallocated KV cache that sequences join and leave
between steps: what the service's continuous batching drives; greedy and sampling, beam search goes to
transformers). Greedy tokens are equal (tests/test_decode_loop.py, tests/test_hf_parity.py).

Each result carries the text, the token ids and the per-token log-probabilities (of the raw model
distribution for greedy and sampling; the beam's step scores for beam search), which the box codec turns
into per-box scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin

from qformer.bridge import Bridge, LLMInputs, left_align
from qformer.llama_step import LlamaStep, unsupported


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


# --- our own decode loop: a static KV cache of rows, prefill, then one step at a time ---------------------------
#
# The cache holds `max_rows` sequences of at most `max_len` positions each, allocated once. The running
# sequences occupy rows [0, n) (a finished one's row is refilled by the last row), and every decode step
# writes all of them at one shared column `t`. A sequence's positions are the columns [start, t) of its
# row; the 4-D mask passed to the model shows each query exactly those, so rows of different lengths,
# joined at different steps, share one forward. Newcomers are prefilled together, left-padded, into the
# columns just before `t`; when `t` reaches `max_len` the rows are shifted left by the oldest start.
#
# A row may start from a `Prefix`: the keys and values of its first positions, computed once
# (`Decoder.prefill_prefix`) and kept by the caller, e.g. a cached image's `[quality][queries]` that every
# question about it begins with. Its prefill then runs only the positions after the prefix; the prefix's
# keys are pinned into its columns at every layer, after the forward's own writes (a shorter row's padding
# queries fall on those columns).


class _SlotLayer(CacheLayerMixin):
    """One layer of `SlotCache`: keys and values (max_rows, kv_heads, max_len, head_dim), allocated on first use."""

    is_compileable = False

    def __init__(self, cache: "SlotCache", index: int):
        super().__init__()
        self.cache, self.index = cache, index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, length = self.cache.max_rows, self.cache.max_len
        self.keys = key_states.new_zeros(rows, key_states.shape[1], length, key_states.shape[-1])
        self.values = value_states.new_zeros(rows, value_states.shape[1], length, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cache
        keys, values = self.keys[c.rows], self.values[c.rows]  # views of the rows this forward runs
        keys[:, :, c.columns] = key_states
        values[:, :, c.columns] = value_states
        for row, columns, prefix in c.pins:
            keys[row, :, columns] = prefix.keys[self.index]
            values[row, :, columns] = prefix.values[self.index]
        return keys[:, :, c.window], values[:, :, c.window]

    def move(self, src: slice, dst: slice, rows: slice) -> None:
        if self.is_initialized:
            for t in (self.keys, self.values):
                t[rows, :, dst] = t[rows, :, src].clone()

    def copy_row(self, src: int, dst: int, columns: slice) -> None:
        if self.is_initialized:
            for t in (self.keys, self.values):
                t[dst, :, columns] = t[src, :, columns]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.max_len, 0  # unused: the decoder passes its own 4-D mask

    def get_seq_length(self) -> int:
        return 0  # unused: the decoder passes position ids

    def get_max_length(self) -> int:
        return self.cache.max_len


class SlotCache(Cache):
    """The decoder's static KV cache. Before each forward the decoder sets which rows run (`rows`), the
    columns the new keys go to (`columns`), the columns attention reads (`window`) and the prefixes written
    over the new keys (`pins`: (row of `rows`, columns, Prefix))."""

    def __init__(self, num_layers: int, max_rows: int, max_len: int):
        self.max_rows, self.max_len = max_rows, max_len
        self.rows = self.columns = self.window = slice(0, 0)
        self.pins: list[tuple[int, slice, Prefix]] = []
        super().__init__(layers=[_SlotLayer(self, i) for i in range(num_layers)])

    def move_columns(self, src: slice, dst: slice, rows: slice) -> None:
        for layer in self.layers:
            layer.move(src, dst, rows)

    def copy_row(self, src: int, dst: int, columns: slice) -> None:
        for layer in self.layers:
            layer.copy_row(src, dst, columns)


@dataclass(frozen=True, eq=False)
class Prefix:
    """The keys and values of a row's first `length` positions: per layer (kv_heads, length, head_dim)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (*self.keys, *self.values))


@dataclass(eq=False)
class Sequence:
    """One prompt row being decoded: the tokens so far, their log-probs and whether it has finished."""

    config: GenerationConfig
    length: int  # prompt positions (quality + queries + text)
    generator: torch.Generator | None = None  # sampling: a seeded row draws from its own generator
    owner: object = None  # whatever the caller ties the row to (the engine: its request)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    done: bool = False
    row: int = -1  # the cache row while running
    start: int = 0  # the cache column of its first position


class Decoder:
    """Greedy and sampled decoding over a `SlotCache`; sequences join (`add`) and leave between steps.
    Its methods run in inference mode (cheaper per op than no_grad): its cache and `Prefix`es are inference
    tensors, changed only through the decoder.

    A Llama LLM runs through `LlamaStep` (its forward written out over the same weights; `plain=True`, or
    another architecture, runs transformers' forward). Not thread-safe: one thread (the engine's model
    thread) calls `add`, `step` and `remove`.
    """

    def __init__(self, bridge: Bridge, tokenizer: PreTrainedTokenizerBase, max_rows: int, max_len: int,
                 plain: bool = False):
        self.llm = bridge.llm
        self.fast = None if plain or unsupported(self.llm) else LlamaStep(self.llm, max_positions=max_len)
        self.embed = self.llm.get_input_embeddings()
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.max_rows, self.max_len = max_rows, max_len
        text = self.llm.config.get_text_config()
        self.cache = SlotCache(text.num_hidden_layers, max_rows, max_len)
        param = next(self.llm.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.running: list[Sequence] = []  # running[i].row == i
        self.t = 0  # the column the next decode step writes

    @property
    def free_rows(self) -> int:
        return self.max_rows - len(self.running)

    def fits(self, prompt_len: int, config: GenerationConfig) -> bool:
        return config.strategy != "beam" and prompt_len + config.max_new_tokens <= self.max_len

    @torch.inference_mode()
    def add(self, embeds: list[torch.Tensor], seqs: list[Sequence],
            prefixes: list[Prefix | None] | None = None) -> list[Sequence]:
        """Prefill prompt rows `embeds` (each (L_i, D)) for `seqs`, choose their first tokens; return those
        already finished (they take no row). A row with a prefix (`prefixes[i]`) gives only the positions
        after it in `embeds[i]`."""
        prefixes = prefixes or [None] * len(seqs)
        if len(seqs) > self.free_rows:
            raise ValueError(f"{len(seqs)} new rows, {self.free_rows} free")
        lengths = [e.shape[0] + (p.length if p is not None else 0) for e, p in zip(embeds, prefixes)]
        for e, length, s in zip(embeds, lengths, seqs):
            if e.shape[0] == 0:
                raise ValueError("a row needs at least one position after its prefix")
            if not self.fits(length, s.config):
                raise ValueError(f"{length} prompt positions + {s.config.max_new_tokens} new tokens do not "
                                 f"fit a cache of {self.max_len} (or beam search)")
        width = max(lengths)  # the columns before t the new rows take
        n, m = len(self.running), len(seqs)
        if n == 0:
            self.t = width
        elif self.t < width:  # not enough columns before t: move the running rows right
            shift = width - self.t
            self.cache.move_columns(slice(0, self.t), slice(shift, shift + self.t), slice(0, n))
            for s in self.running:
                s.start += shift
            self.t = width
        computed = max(e.shape[0] for e in embeds)  # the columns the forward runs
        x = torch.zeros(m, computed, embeds[0].shape[-1], device=self.device, dtype=self.dtype)
        starts = []
        for i, (e, length, p, s) in enumerate(zip(embeds, lengths, prefixes, seqs)):
            x[i, computed - e.shape[0]:] = e.to(self.dtype)
            s.start, s.row = self.t - length, n + i
            starts.append(s.start)
            if p is not None:
                self.cache.pins.append((i, slice(s.start, s.start + p.length), p))
        try:
            logits = self._forward(x, slice(n, n + m), slice(self.t - computed, self.t), self.t - width, starts)
        finally:
            self.cache.pins.clear()
        self.running.extend(seqs)
        self._choose(seqs, logits)
        return self._retire()

    @torch.inference_mode()
    def prefill_prefix(self, embeds: torch.Tensor) -> Prefix:
        """The keys and values of the positions `embeds` (P, D), for rows that begin with them (`add`)."""
        cache = SlotCache(len(self.cache.layers), 1, embeds.shape[0])
        self._forward(embeds[None].to(self.dtype), slice(0, 1), slice(0, embeds.shape[0]), 0, [0], cache)
        return Prefix(tuple(layer.keys[0] for layer in cache.layers), tuple(layer.values[0] for layer in cache.layers))

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One token for every running sequence; return the sequences that finished (and left)."""
        if not self.running:
            return []
        if self.t == self.max_len:  # out of columns: shift every row left by the oldest start
            lo = min(s.start for s in self.running)
            self.cache.move_columns(slice(lo, self.t), slice(0, self.t - lo), slice(0, len(self.running)))
            for s in self.running:
                s.start -= lo
            self.t -= lo
        n = len(self.running)
        last = torch.tensor([[s.ids[-1]] for s in self.running], device=self.device)
        x = self.embed(last).to(self.dtype)  # (n, 1, D)
        starts = [s.start for s in self.running]
        logits = self._forward(x, slice(0, n), slice(self.t, self.t + 1), min(starts), starts)
        self.t += 1
        self._choose(self.running, logits)
        return self._retire()

    @torch.inference_mode()
    def remove(self, seq: Sequence) -> None:
        """Take a running sequence out (cancelled); its row is refilled by the last one."""
        if seq.row < 0:
            return
        seq.done = True
        self._retire()

    def _forward(self, x, rows: slice, columns: slice, lo: int, starts: list[int],
                 cache: SlotCache | None = None) -> torch.Tensor:
        """Run the LLM on `x` (m, q, D) for `rows` of `cache` (the decoder's own by default), the queries at
        `columns`, reading the keys from column `lo` on; `starts[i]` is row i's first column. Returns the last
        position's logits (m, V) fp32."""
        cache = self.cache if cache is None else cache
        cache.rows, cache.columns, cache.window = rows, columns, slice(lo, columns.stop)
        start = torch.tensor(starts, device=self.device)
        q = torch.arange(columns.start, columns.stop, device=self.device)  # (q,) query columns
        positions = (q[None, :] - start[:, None]).clamp(min=0)  # (m, q)
        if self.fast is not None and len(q) == 1 and max(starts) == lo:
            # One new token per row, every row starting at `lo`: each query sees the whole window, no mask
            # (batch 1 always; and rows that joined together).
            return self.fast(x, None, positions, cache)
        k = torch.arange(lo, columns.stop, device=self.device)  # (w,) key columns
        # A query sees its own row's positions up to itself; a padding query sees only itself (never a
        # fully masked row, whose NaN would reach the next layer's keys).
        seen = (k[None, None, :] >= start[:, None, None]) & (k[None, None, :] <= q[None, :, None])
        seen |= k[None, None, :] == q[None, :, None]
        if self.fast is not None:
            return self.fast(x, seen[:, None], positions, cache)
        mask = torch.zeros(seen.shape, device=self.device, dtype=self.dtype)
        mask.masked_fill_(~seen, torch.finfo(self.dtype).min)
        out = self.llm(inputs_embeds=x, attention_mask=mask[:, None], position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """The next token of each sequence (row i of `logits`), its raw log-prob, and whether it is done."""
        logprobs = logits.log_softmax(-1)
        scores = logits
        if any(s.config.repetition_penalty != 1.0 for s in seqs):
            scores = logits.clone()
            for i, s in enumerate(seqs):
                p = s.config.repetition_penalty
                if p != 1.0 and s.ids:  # transformers' penalty: over the generated tokens (the prompt is embeddings)
                    seen = torch.tensor(s.ids, device=scores.device)
                    picked = scores[i, seen]
                    scores[i, seen] = torch.where(picked < 0, picked * p, picked / p)
        tokens = scores.argmax(-1)
        for i, s in enumerate(seqs):
            if s.config.strategy == "sample":
                tokens[i] = sample(scores[i], s.config, s.generator)
        chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)
        for s, tok, lp in zip(seqs, tokens.tolist(), chosen.tolist()):
            s.ids.append(tok)
            s.logprobs.append(lp)
            if tok == self.eos or len(s.ids) >= s.config.max_new_tokens or self._stopped(s):
                s.done = True

    def _stopped(self, s: Sequence) -> bool:
        if not s.config.stop:
            return False
        text = self.tokenizer.decode(s.ids, skip_special_tokens=True)
        return any(stop in text for stop in s.config.stop)

    def _retire(self) -> list[Sequence]:
        """Drop finished sequences, moving the last running row into each freed row."""
        finished = [s for s in self.running if s.done]
        if not finished:
            return []
        lo = min(s.start for s in self.running)
        for s in finished:
            last = self.running.pop()
            if last is not s:
                self.cache.copy_row(last.row, s.row, slice(lo, self.t))
                last.row = s.row
                self.running[s.row] = last
            s.row = -1
        return finished


def sample(scores: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token from scores (V,) as transformers samples: temperature, then top-k, then top-p."""
    scores = scores / config.temperature
    if config.top_k:
        kth = scores.topk(min(config.top_k, scores.shape[-1])).values[-1]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if config.top_p < 1.0:
        ordered, order = scores.sort()  # ascending, as transformers' TopPLogitsWarper
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - config.top_p
        drop[-1] = False  # keep at least one
        scores = scores.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]


def row_generators(config: GenerationConfig, rows: int, device) -> list[torch.Generator | None]:
    """A seeded sampling request gives row i the seed `seed + i`: reproducible whatever its batch."""
    if config.strategy != "sample" or config.seed is None:
        return [None] * rows
    return [torch.Generator(device=device).manual_seed(config.seed + i) for i in range(rows)]


@torch.no_grad()
def decode_from_queries(
    bridge: Bridge,
    tokenizer: PreTrainedTokenizerBase,
    query_embeds: torch.Tensor,
    prompts: list[str],
    quality: list[int] | None = None,
    config: GenerationConfig = GenerationConfig(),
) -> list[Generated]:
    """`generate_from_queries` through our own `Decoder` (greedy and sampling; beam search goes to transformers)."""
    if config.strategy == "beam":
        return generate_from_queries(bridge, tokenizer, query_embeds, prompts, quality, config)
    if len(prompts) != query_embeds.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {query_embeds.shape[0]} images")
    rows = row_embeddings(prepare_inputs(bridge, tokenizer, query_embeds, prompts, quality))
    decoder = Decoder(bridge, tokenizer, len(rows), max(r.shape[0] for r in rows) + config.max_new_tokens)
    gens = row_generators(config, len(rows), query_embeds.device)
    seqs = [Sequence(config, r.shape[0], g) for r, g in zip(rows, gens)]
    decoder.add(rows, seqs)
    while decoder.running:
        decoder.step()
    return [finish(tokenizer, s.ids, s.logprobs, config) for s in seqs]
