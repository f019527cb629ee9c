"""Generation with transformers' `generate` through `qformer.generation.generate_from_queries`, CPU or CUDA.

Runs on the engine's model thread (one batch at a time), so the event loop never waits on torch.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

from qformer.generation import GenerationConfig, Generated, generate_from_queries


class TorchBackend:
    name = "torch"
    uses_model_thread = True

    def __init__(self, bridge, tokenizer, executor: ThreadPoolExecutor | None = None):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self._executor = executor
        self._own_executor = executor is None

    async def start(self) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qbridge-torch")

    async def generate(
        self,
        query_embeds: torch.Tensor,
        prompts: list[str],
        quality: list[int] | None,
        config: GenerationConfig,
    ) -> list[Generated]:
        if self._executor is None:
            raise RuntimeError("TorchBackend.generate() before start()")
        run = functools.partial(generate_from_queries, self.bridge, self.tokenizer, query_embeds, prompts, quality,
                                config)
        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def close(self) -> None:
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
