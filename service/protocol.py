"""Request and response schemas (pydantic only: no torch, no FastAPI).

Task endpoints take the image one of three ways, exactly one per request:
  - multipart/form-data with the file in a `file` or `image` part (the other fields as form fields; list
    fields repeat), or
  - JSON with `image`: base64 or a `data:image/...;base64,` URL, or
  - JSON (or form) with `image_id` from `POST /v1/images` (the encoded image is reused).

JSON bodies are validated strictly (`"5"` is not an integer) and unknown fields are refused (422).
Counts and lengths that are service limits (questions per request, characters per question) are
checked at runtime against the settings and refused with 400, as service/BAD_INPUTS.md rows 4-5 say.

Generation settings: `strategy` is greedy unless given; giving `num_beams` > 1 alone means beam, giving
`temperature` or `top_p` alone means sample.

Alignment endpoints (`/v1/classify`, `/v1/match`, `/v1/embeddings`) answer from the Q-Former's own ITC/ITM
heads, no LLM. Their list counts and text lengths are schema bounds (422); an `/v1/embeddings` input is text
unless it is a data URL (`data:image/...;base64,...`) or an image_id, so its length is checked at runtime.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

MAX_NEW_TOKENS = 256
IMAGE_ID_PATTERN = r"^img_[A-Za-z0-9_-]{8,64}$"
# Labels are written into the prompt and parsed back from the model's sequence: the box codec's separators
# (';', '<', '>') would break both.
LABEL_PATTERN = r"^[^;<>\x00-\x1f]*\S[^;<>\x00-\x1f]*$"
# Alignment bounds (classify / match / embeddings). The Q-Former reads at most 64 tokens of a text anyway.
MAX_LABELS = 64
MAX_LABEL_CHARS = 200
MAX_TEMPLATES = 16
MAX_TEMPLATE_CHARS = 200
MAX_MATCH_TEXTS = 32
MAX_TEXT_CHARS = 2000
MAX_EMBEDDING_INPUTS = 64


QualityValue = Union[Annotated[int, Field(ge=0, le=1000)], Annotated[str, Field(min_length=1, max_length=64)]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- requests --------------------------------------------------------------------------------------


class ImageSource(_Body):
    image: str | None = Field(
        None, description="the image as base64 or a data URL (data:image/png;base64,...); or, in multipart, "
        "the file uploaded as the part `image` or `file`"
    )
    image_id: str | None = Field(
        None, pattern=IMAGE_ID_PATTERN, description="an id from POST /v1/images: skips the vision encoder"
    )


class GenerationParams(_Body):
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description="default depends on the task")
    strategy: Literal["greedy", "beam", "sample"] | None = None
    num_beams: int | None = Field(None, ge=1, le=8, description="beam search width")
    temperature: float | None = Field(None, gt=0, le=2, allow_inf_nan=False, description="sampling only")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="sampling only")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="makes sampling reproducible")


class CaptionRequest(ImageSource, GenerationParams):
    quality: QualityValue | None = Field(
        None, description="quality level: its number or name (GET /v1/models lists them); default: the highest"
    )


class VQARequest(ImageSource, GenerationParams):
    question: str | None = Field(None, description="one question (or use `questions`); at most 2000 characters")
    questions: list[str] | None = Field(
        None, description="several questions about the same image, answered together (at most 16)"
    )
    task: str | None = Field(
        None, max_length=64, description="a task prompt by name (GET /v1/models lists them): its learned vectors "
        "follow the image's queries; without a question, the question the task was trained with")


class DetectRequest(ImageSource, GenerationParams):
    labels: list[Annotated[str, Field(max_length=100, pattern=LABEL_PATTERN)]] | None = Field(
        None, max_length=32, description="only objects with these labels (also written into the prompt)"
    )
    max_objects: int = Field(10, ge=1, le=100)
    score_threshold: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)


class ClassifyRequest(ImageSource):
    labels: list[Annotated[str, Field(max_length=MAX_LABEL_CHARS)]] = Field(
        min_length=1, max_length=MAX_LABELS,
        description=f"the candidate labels (1 to {MAX_LABELS}, distinct, each at most {MAX_LABEL_CHARS} characters)",
    )
    templates: list[Annotated[str, Field(max_length=MAX_TEMPLATE_CHARS)]] | None = Field(
        None, min_length=1, max_length=MAX_TEMPLATES,
        description="prompt templates, each with exactly one {} where the label goes (default: 'a photo of a {}.'); "
        "with several, they are combined as `ensemble` says (prompt ensembling)",
    )
    ensemble: Literal["mean", "max"] = Field(
        "mean", description="how a label's templates combine: 'mean' averages its text features over them (CLIP's "
        "prompt ensembling); 'max' scores it by its best template, for templates that vary what the labels do not "
        "name ('a red {}', 'a blue {}', ...)")


class MatchRequest(ImageSource):
    texts: list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1, max_length=MAX_MATCH_TEXTS,
        description=f"texts to score against the image (1 to {MAX_MATCH_TEXTS}, each at most {MAX_TEXT_CHARS} "
        "characters)",
    )


class EmbeddingRequest(_Body):
    """OpenAI's embeddings request. An input is embedded as text unless it is a data URL
    (`data:image/png;base64,...`) or an image_id from POST /v1/images: then as an image."""

    model: str | None = Field(None, max_length=256, description="the served model's id (GET /v1/models)")
    # Checked by service.align.embedding_inputs (422 naming `input` or `input.<i>`, not a union member's tag).
    input: Annotated[Any, WithJsonSchema({"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS},
    ]})] = Field(
        description=f"a text, an image (data URL or image_id), or a list of up to {MAX_EMBEDDING_INPUTS} of them "
        f"(texts at most {MAX_TEXT_CHARS} characters; images at most as many as per request elsewhere)"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="float: lists of numbers; base64: little-endian float32 bytes, base64-encoded"
    )
    dimensions: int | None = Field(None, ge=1, description="accepted only when equal to the model's embedding_dim")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")


class ImageUploadRequest(_Body):
    image: str = Field(description="the image as base64 or a data URL; or, in multipart, "
                       "the file uploaded as the part `image` or `file`")


# --- responses -------------------------------------------------------------------------------------


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Out):
    queue_ms: float = Field(description="admission to the start of the request's first batch")
    encode_ms: float = Field(description="vision encoder + Q-Former batch; 0 for a cached image")
    generate_ms: float
    total_ms: float
    cached: bool = Field(description="the image came from the image cache (image_id)")


class AlignmentTimings(_Out):
    queue_ms: float = Field(description="admission to the start of the request's first batch")
    encode_ms: float = Field(description="vision encoder batch; 0 for a cached image")
    align_ms: float = Field(description="the Q-Former's ITC/ITM heads (the batch this request ran in)")
    total_ms: float
    cached: bool = Field(description="the image came from the image cache (image_id)")


class QualityInfo(_Out):
    level: int
    name: str


class ImageSize(_Out):
    width: int
    height: int


class CaptionResponse(_Out):
    caption: str
    quality: QualityInfo | None
    finish_reason: str
    usage: Usage
    timings: Timings
    model: str


class Answer(_Out):
    question: str
    answer: str


class VQAResponse(_Out):
    answers: list[Answer]
    usage: Usage
    timings: Timings
    model: str


class Detection(_Out):
    label: str
    score: float
    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the original image (after EXIF rotation)")
    box_normalized: list[float] = Field(description="[x1, y1, x2, y2] divided by the image width/height")


class DetectResponse(_Out):
    sequence: str = Field(description="the generated token text, location tokens included")
    detections: list[Detection]
    image: ImageSize
    usage: Usage
    timings: Timings
    model: str


class LabelProbability(_Out):
    label: str
    probability: float


class ClassifyResponse(_Out):
    labels: list[LabelProbability] = Field(description="every label with its probability, highest first")
    templates: list[str] = Field(description="the templates the labels were written into")
    ensemble: str = Field(description="how each label's templates were combined: 'mean' or 'max'")
    timings: AlignmentTimings
    model: str


class TextMatch(_Out):
    text: str
    itm_probability: float = Field(description="image-text matching head: the probability the text describes the "
                                   "image")
    itc_similarity: float = Field(description="cosine similarity in the shared ITC space (max over the queries)")


class MatchResponse(_Out):
    matches: list[TextMatch] = Field(description="one per text, in request order")
    timings: AlignmentTimings
    model: str


class Embedding(_Out):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="unit-norm vector (base64 of float32 with "
                                         "encoding_format=base64)")


class EmbeddingUsage(_Out):
    prompt_tokens: int = Field(description="Q-Former text tokens, plus the query tokens of each image")
    total_tokens: int


class EmbeddingResponse(_Out):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ImageInfo(_Out):
    object: Literal["image"] = "image"
    image_id: str
    width: int
    height: int
    created_at: int
    expires_at: int = Field(description="unix seconds; the entry may be evicted earlier when the cache is full")
    encode_ms: float


class ImageDeleted(_Out):
    image_id: str
    deleted: bool


class QualityLevel(_Out):
    level: int
    name: str


class TaskInfo(_Out):
    name: str
    description: str
    question: str = Field(description="the question it was trained with; asked when a request sends none")
    vectors: int = Field(description="learned soft prompt vectors (prompt tuning)")
    figures: dict[str, float | int | str] = Field(description="accuracy before and after training, and its cost")


class ModelCapabilities(_Out):
    quality_levels: list[QualityLevel]
    default_quality: int | None
    detection: bool
    num_loc_bins: int
    alignment: bool = Field(description="the Q-Former's own heads answer /v1/classify, /v1/match, /v1/embeddings")
    embedding_dim: int | None = Field(description="length of /v1/embeddings vectors (None without alignment)")
    backend: str
    device: str
    max_new_tokens: int
    limits: dict[str, int]
    tasks: list[TaskInfo] = Field(default_factory=list, description="task prompts a /v1/vqa request picks by `task`")


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "qbridge"
    qbridge: ModelCapabilities


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Out):
    status: str


class ErrorBody(_Out):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(_Out):
    error: ErrorBody


# --- OpenAI chat completions -----------------------------------------------------------------------


class ImageURL(_Body):
    url: str = Field(description="a data: URL; http(s) only for hosts on the server's allowlist")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted and ignored")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=64)


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: str | None = Field(None, max_length=256, description="the served model's id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0 or absent: greedy")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=1, description="only 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: str | list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=4)
    user: str | None = Field(None, max_length=256)
    quality: QualityValue | None = Field(
        None, description="qbridge extension: caption quality level (number or name)"
    )


class ChatResponseMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int
    message: ChatResponseMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


def chunk(completion_id: str, created: int, model: str, delta: dict[str, Any] | None,
          finish_reason: str | None = None, usage: Usage | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` object of a stream (OpenAI's shape); `delta=None` for the usage-only chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    out: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": choices}
    if usage is not None:
        out["usage"] = usage.model_dump()
    return out
