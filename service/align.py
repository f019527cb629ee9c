"""The alignment endpoints' request mapping: labels, texts, templates and embeddings inputs checked into what
the engine's `AlignJob` / `EmbedJob` take, and vectors written back as OpenAI's `encoding_format` says.

    labels = check_labels(req.labels)                 # stripped, whitespace collapsed, distinct, not blank
    templates = check_templates(req.templates)        # exactly one {} each; default qformer.alignment's
    texts = check_texts(req.texts)                    # stripped, not blank
    inputs = embedding_inputs(req.input, limits)      # [("text", str) | ("data_url", str) | ("image_id", str)]
    embedding_value(vector, "base64")                 # list of floats, or base64 of little-endian float32

Every refusal is a 400 with a fixed message and `param` naming the list item (`labels.2`, `input.0`).
An embeddings input is an image when it is a data URL (`data:` + a media type + `,`, no spaces before the
comma: `data:image/png;base64,...`) or matches `IMAGE_ID_PATTERN`; anything else is text.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import torch

from qformer.alignment import DEFAULT_TEMPLATES
from service.errors import BadRequest, TooManyItems, validation_error
from service.images import ImageLimits
from service.protocol import IMAGE_ID_PATTERN, MAX_EMBEDDING_INPUTS, MAX_TEXT_CHARS

_DATA_URL = re.compile(r"\s*data:[^\s,]{0,256},", re.IGNORECASE)
_IMAGE_ID = re.compile(IMAGE_ID_PATTERN.removeprefix("^").removesuffix("$"))


def _clean(text: str, *, param: str, what: str, empty_code: str) -> str:
    if "\x00" in text:
        raise BadRequest(f"the {what} contains a NUL character", param=param, code="invalid_text")
    text = " ".join(text.split())
    if not text:
        raise BadRequest(f"the {what} is empty", param=param, code=empty_code)
    return text


def check_labels(raw: list[str]) -> tuple[str, ...]:
    labels = tuple(_clean(label, param=f"labels.{i}", what="label", empty_code="empty_label")
                   for i, label in enumerate(raw))
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        if label in seen:
            raise BadRequest(f"labels {seen[label]} and {i} are the same label; give each label once",
                             param=f"labels.{i}", code="duplicate_label")
        seen[label] = i
    return labels


def check_templates(raw: list[str] | None) -> tuple[str, ...]:
    if raw is None:
        return tuple(DEFAULT_TEMPLATES)
    out = []
    for i, template in enumerate(raw):
        if template.count("{}") != 1 or "{" in template.replace("{}", "", 1) or "}" in template.replace("{}", "", 1):
            raise BadRequest("a template holds exactly one {} where the label goes, and no other braces "
                             "(e.g. 'a photo of a {}.')", param=f"templates.{i}", code="invalid_template")
        if "\x00" in template:
            raise BadRequest("the template contains a NUL character", param=f"templates.{i}", code="invalid_text")
        out.append(template)
    return tuple(out)


def check_texts(raw: list[str]) -> tuple[str, ...]:
    return tuple(_clean(text, param=f"texts.{i}", what="text", empty_code="empty_text") for i, text in enumerate(raw))


def embedding_inputs(raw: Any, limits: ImageLimits) -> list[tuple[str, str]]:
    """Each input as ("text", text), ("data_url", the image string) or ("image_id", id), in order.

    `raw` is the request's `input` as parsed JSON: a string or a list of 1 to MAX_EMBEDDING_INPUTS strings,
    else 422 (token arrays are not accepted)."""
    if isinstance(raw, list):
        if not raw:
            raise validation_error([{"type": "too_short", "loc": ("input",), "ctx": {"min_length": 1}}])
        if len(raw) > MAX_EMBEDDING_INPUTS:
            raise validation_error([{"type": "too_long", "loc": ("input",),
                                     "ctx": {"max_length": MAX_EMBEDDING_INPUTS}}])
        for i, value in enumerate(raw):
            if not isinstance(value, str):
                raise validation_error([{"type": "string_type", "loc": ("input", i)}])
    elif not isinstance(raw, str):
        raise validation_error([{"type": "string_type", "loc": ("input",)}])
    items = [raw] if isinstance(raw, str) else list(raw)
    out: list[tuple[str, str]] = []
    for value, param in zip(items, input_params(raw)):
        if _DATA_URL.match(value[:300]):
            out.append(("data_url", value))
        elif _IMAGE_ID.fullmatch(value):
            out.append(("image_id", value))
        else:
            if not value:
                raise BadRequest("an input is an empty string", param=param, code="empty_input")
            if len(value) > MAX_TEXT_CHARS:
                raise BadRequest(f"text input is {len(value)} characters; the limit is {MAX_TEXT_CHARS}",
                                 param=param, code="text_too_long")
            if "\x00" in value:
                raise BadRequest("the text input contains a NUL character", param=param, code="invalid_text")
            out.append(("text", value))
    images = sum(kind != "text" for kind, _ in out)
    if images > limits.max_images:
        raise TooManyItems(f"request has {images} images; the limit is {limits.max_images}", param="input",
                           code="too_many_images")
    return out


def input_params(raw: Any) -> list[str]:
    """What `param` names each input in errors: `input` for a lone string, `input.<i>` in a list."""
    return [f"input.{i}" for i in range(len(raw))] if isinstance(raw, list) else ["input"]


def embedding_value(vector: torch.Tensor, encoding_format: str) -> Any:
    if encoding_format == "base64":
        return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()
    return vector.float().tolist()
