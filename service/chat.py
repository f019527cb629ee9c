"""The OpenAI chat-completions mapping: which task a conversation asks for, and the SSE stream.

The image is the last `image_url` part in the conversation's user messages; the text is the text of the
last user message (parts joined by spaces). The text picks the task:

    ""  /  "describe ..."  /  "caption ..."     -> caption (at `quality`, default the highest level)
    anything else                               -> a question: the VQA prompt

("Describe this image.", "caption", "Caption the photo in detail" are captions; "What colour is the
circle?" and "how many shapes" are questions.) System and assistant messages are accepted and not used:
the model answers one image and one instruction.

`stream: true` answers with `chat.completion.chunk` events in OpenAI's format (a role chunk, content
chunks, a chunk with `finish_reason`, a usage chunk when `stream_options.include_usage`), then
`data: [DONE]`. Generation is batched, not incremental, so the chunks follow the finished text.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from service.errors import BadRequest
from service.images import ImageLimits, check_counts
from service.protocol import ChatMessage, ImagePart, TextPart, Usage, chunk

CAPTION_VERBS = ("describe", "caption")


def conversation(messages: list[ChatMessage], limits: ImageLimits) -> tuple[str, str]:
    """(image URL, instruction text) of a conversation; 400 without an image or with too many."""
    urls: list[str] = []
    text = ""
    for m in messages:
        if m.role != "user":
            continue
        parts = m.content if isinstance(m.content, list) else [TextPart(type="text", text=m.content or "")]
        urls += [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        text = " ".join(p.text for p in parts if isinstance(p, TextPart))
    check_counts(limits, images=len(urls))
    if not urls:
        raise BadRequest("no image: add an image_url content part (a data: URL) to a user message",
                         param="messages", code="missing_image")
    return urls[-1], text


def task_for(text: str) -> tuple[str, str]:
    """("caption", "") or ("vqa", question) for the instruction text (see the module docstring)."""
    words = " ".join(text.split())
    first = re.match(r"[a-z]+", words.lower())
    if not words or (first is not None and first.group(0) in CAPTION_VERBS):
        return "caption", ""
    return "vqa", words


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def sse_stream(completion_id: str, created: int, model: str, text: str, finish_reason: str,
                     usage: Usage, include_usage: bool) -> AsyncIterator[bytes]:
    yield _sse(chunk(completion_id, created, model, {"role": "assistant", "content": ""}))
    for piece in re.findall(r"\s*\S+|\s+$", text):  # pieces concatenate back to exactly `text`
        yield _sse(chunk(completion_id, created, model, {"content": piece}))
    yield _sse(chunk(completion_id, created, model, {}, finish_reason))
    if include_usage:
        yield _sse(chunk(completion_id, created, model, None, usage=usage))
    yield b"data: [DONE]\n\n"
