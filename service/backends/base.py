"""The interface between the engine and a generation backend.

The engine owns admission, batching and image encoding (`bridge.encode_images` + `bridge.project_queries`);
a backend only turns a batch of projected queries (B, Q, D) plus B prompts into B `Generated` rows, with the
same meaning as `qformer.generation.generate_from_queries`:

    outputs = await backend.generate(query_embeds, prompts, quality, config)

- `quality` is None or one level per row.
- A `ValueError` means "these settings are not supported by this backend" (e.g. beam search on vLLM): the
  engine answers 400. Anything else is a server error.
- Cancelling the `generate` coroutine must be safe (a client went away); the backend may finish the work
  but must drop the result.

Two optional attributes tell the engine how to schedule a backend:
- `uses_model_thread = True`: generation runs on the engine's single model thread (passed to the
  constructor), so encode and generate batches take turns on it.
- `max_concurrent_batches` (default 4 when `uses_model_thread` is false): how many generate batches the
  engine keeps in flight at once (a continuous-batching engine such as vLLM interleaves them itself).

A backend with `continuous = True` (torch) is scheduled token by token instead: the engine takes a
`qformer.generation.Decoder` from `new_decoder(max_rows)`, row embeddings from `prompt_rows`, and runs the
decoder on the model thread through `await backend.call(fn, *args)`; `generate` then only serves what a
decoder refuses (`Decoder.fits`: beam search, rows too long for its cache).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from qformer.generation import GenerationConfig, Generated


@runtime_checkable
class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def generate(
        self,
        query_embeds: torch.Tensor,
        prompts: list[str],
        quality: list[int] | None,
        config: GenerationConfig,
    ) -> list[Generated]: ...

    async def close(self) -> None: ...
