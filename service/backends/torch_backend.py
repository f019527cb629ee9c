"""Generation with our own decode loop (`qformer.generation.Decoder`), CPU or CUDA.

The engine schedules this backend token by token (`continuous = True`): it asks for a `Decoder` over
`max_rows` sequences and runs `add` / `step` / `remove` on the model thread through `call`, so requests
join and leave the running batch between steps (see `service.batching`). `generate` is the whole-batch
path of the `Backend` protocol (`decode_from_queries`); the engine sends it what a decoder cannot run:
beam search, and rows longer than `max_len` positions.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from qformer.generation import Decoder, GenerationConfig, Generated, decode_from_queries, prepare_inputs, row_embeddings


class TorchBackend:
    name = "torch"
    uses_model_thread = True
    continuous = True

    def __init__(self, bridge, tokenizer, executor: ThreadPoolExecutor | None = None, max_len: int = 512):
        """`max_len`: cache positions per running row (prompt + new tokens); longer rows take `generate`."""
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.max_len = max_len
        self._executor = executor
        self._own_executor = executor is None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbridge-torch")

    def new_decoder(self, max_rows: int) -> Decoder:
        """A decoder for the engine; its cache is allocated on its first prefill."""
        return Decoder(self.bridge, self.tokenizer, max_rows, self.max_len)

    @torch.no_grad()
    def prompt_rows(self, query_embeds: torch.Tensor, prompts: list[str],
                    quality: list[int] | None) -> list[torch.Tensor]:
        """Each row's `[quality][queries][BOS prompt]` embeddings (L_i, D): what `Decoder.add` takes."""
        return row_embeddings(prepare_inputs(self.bridge, self.tokenizer, query_embeds, prompts, quality))

    async def call(self, fn, *args):
        """Run `fn(*args)` on the model thread."""
        if self._executor is None:
            raise RuntimeError("TorchBackend used before start()")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def generate(
        self,
        query_embeds: torch.Tensor,
        prompts: list[str],
        quality: list[int] | None,
        config: GenerationConfig,
    ) -> list[Generated]:
        run = functools.partial(decode_from_queries, self.bridge, self.tokenizer, query_embeds, prompts, quality,
                                config)
        return await self.call(run)

    async def close(self) -> None:
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
