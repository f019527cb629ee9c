"""HTTP routes. Thin: parse and check the request, build a `Job`, run it on the engine, shape the answer.

Every task route: early 503 when the engine cannot admit (before reading the body) -> body (JSON or
multipart) -> the image decoded off the loop -> admission -> the job, abandoned if the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from qformer.boxes import DETECT_TOKENS_PER_OBJECT, BoxCodec
from qformer.generation import GenerationConfig
from service import align
from service import chat as chatmap
from service.bodies import decode_image, image_source, media_type, read_body, read_json
from service.engine import AlignJob, AlignResult, EmbedJob, Engine, Job, JobResult
from service.errors import (
    BadRequest,
    NotFound,
    Overloaded,
    ServiceError,
    UnsupportedMediaType,
    ValidationFailed,
    error_response,
)
from service.images import check_counts, check_question
from service.protocol import (
    IMAGE_ID_PATTERN,
    MAX_EMBEDDING_INPUTS,
    MAX_LABELS,
    MAX_MATCH_TEXTS,
    MAX_NEW_TOKENS,
    MAX_TEMPLATES,
    MAX_TEXT_CHARS,
    AlignmentTimings,
    Answer,
    CaptionRequest,
    CaptionResponse,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ClassifyRequest,
    ClassifyResponse,
    Detection,
    DetectRequest,
    DetectResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorEnvelope,
    GenerationParams,
    Health,
    ImageDeleted,
    ImageInfo,
    ImageSize,
    ImageUploadRequest,
    LabelProbability,
    MatchRequest,
    MatchResponse,
    ModelCapabilities,
    ModelCard,
    ModelList,
    QualityInfo,
    QualityLevel,
    TaskInfo,
    TextMatch,
    Timings,
    Usage,
    VQARequest,
    VQAResponse,
)
from service.remote import fetch_image
from service.state import AppState

router = APIRouter()

STATIC = FilePath(__file__).parent / "static"
DEFAULT_MAX_NEW_TOKENS = {"caption": 40, "vqa": 10}

_ERRORS = {
    status: {"model": ErrorEnvelope, "description": text}
    for status, text in {
        400: "bad request (the message says what)", 401: "missing or invalid API key", 404: "not found",
        413: "body or image too large", 415: "unsupported media type or image format",
        422: "a field is out of its schema bounds", 503: "overloaded, loading or shutting down (Retry-After)",
        504: "the request passed its deadline",
    }.items()
}


def _body_doc(name: str, *, form: bool = True) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}
    if form:
        content["multipart/form-data"] = {"schema": {"$ref": f"#/components/schemas/{name}Form"}}
    return {"requestBody": {"required": True, "content": content}}


def app_state(request: Request) -> AppState:
    return request.app.state.qbridge


# --- helpers -----------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client disconnected while its request was queued or running."""


async def until_disconnect(request: Request, work):
    """Await `work`; if the client disconnects first, cancel it (freeing its queue slot) and raise ClientGone.

    Call after the body has been read: from then on the ASGI `receive` only reports the disconnect.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def run_job(request: Request, engine: Engine, job: Job | AlignJob | EmbedJob):
    async with engine.admit() as ticket:
        return await until_disconnect(request, engine.run(ticket, job))


def disconnected() -> Response:
    return Response(status_code=499)  # nginx's "client closed request": logged and counted, never delivered


def generation_config(p: GenerationParams, default_max_new_tokens: int, stop: tuple[str, ...] = ()) -> GenerationConfig:
    strategy = p.strategy
    if strategy is None:
        if p.num_beams is not None and p.num_beams > 1:
            strategy = "beam"
        elif p.temperature is not None or p.top_p is not None:
            strategy = "sample"
        else:
            strategy = "greedy"
    max_new = p.max_new_tokens or default_max_new_tokens
    if strategy == "beam" and (p.num_beams or 3) > 1:
        return GenerationConfig(max_new_tokens=max_new, strategy="beam", num_beams=p.num_beams or 3, stop=stop)
    if strategy == "sample":
        return GenerationConfig(max_new_tokens=max_new, strategy="sample", temperature=p.temperature or 1.0,
                                top_p=p.top_p or 1.0, seed=p.seed, stop=stop)
    # Greedy (or beam of width 1): unused fields stay at their defaults so equal requests batch together.
    return GenerationConfig(max_new_tokens=max_new, stop=stop)


def resolve_quality(engine: Engine, value: int | str | None) -> int | None:
    cfg = engine.model_config
    if not cfg.num_quality_levels:
        if value is not None:
            raise ValidationFailed("invalid value for 'quality': this model has no quality levels", param="quality")
        return None
    if value is None:
        return cfg.num_quality_levels - 1
    try:
        return cfg.quality_level(value)
    except ValueError:
        known = ", ".join(_level_names(engine))
        raise ValidationFailed(f"invalid value for 'quality': unknown level; this model has {known}",
                               param="quality") from None


def _level_names(engine: Engine) -> list[str]:
    cfg = engine.model_config
    return [f"{i} ({cfg.quality_name(i)})" for i in range(cfg.num_quality_levels)]


def quality_info(engine: Engine, level: int | None) -> QualityInfo | None:
    return None if level is None else QualityInfo(level=level, name=engine.model_config.quality_name(level))


def usage(result: JobResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def timings(result: JobResult) -> Timings:
    t = result.timings
    return Timings(queue_ms=round(t.queue_ms, 3), encode_ms=round(t.encode_ms, 3),
                   generate_ms=round(t.generate_ms, 3), total_ms=round(t.total_ms, 3), cached=t.cached)


def alignment_timings(result: AlignResult) -> AlignmentTimings:
    t = result.timings
    return AlignmentTimings(queue_ms=round(t.queue_ms, 3), encode_ms=round(t.encode_ms, 3),
                            align_ms=round(t.align_ms, 3), total_ms=round(t.total_ms, 3), cached=t.cached)


async def image_job_fields(state: AppState, source: tuple[str, Any]) -> tuple[dict[str, Any], tuple[int, int] | None]:
    """Job fields for the image (`image` or `image_id`) and the original size when decoded here."""
    kind, value = source
    if kind == "image_id":
        return {"image_id": value}, None
    loaded = await decode_image(kind, value, state.limits, state.decode_limiter)
    return {"image": loaded.image}, loaded.original_size


# --- task endpoints --------------------------------------------------------------------------------


@router.post("/v1/caption", response_model=CaptionResponse, responses=_ERRORS,
             openapi_extra=_body_doc("CaptionRequest"), summary="Caption an image at a quality level")
async def caption(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.check_capacity()
    parsed = await read_body(request, CaptionRequest, state.limits)
    req = parsed.model
    quality = resolve_quality(engine, req.quality)
    config = generation_config(req, DEFAULT_MAX_NEW_TOKENS["caption"])
    fields, _ = await image_job_fields(state, image_source(parsed))
    try:
        job = Job(prompts=[engine.model_config.prompts.caption_prompt()], config=config, quality=quality, **fields)
        result = await run_job(request, engine, job)
    except ClientGone:
        return disconnected()
    g = result.outputs[0]
    return CaptionResponse(caption=g.text, quality=quality_info(engine, quality), finish_reason=g.finish_reason,
                           usage=usage(result), timings=timings(result), model=engine.model_name)


@router.post("/v1/vqa", response_model=VQAResponse, responses=_ERRORS, openapi_extra=_body_doc("VQARequest"),
             summary="Answer questions about one image")
async def vqa(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.check_capacity()
    parsed = await read_body(request, VQARequest, state.limits, list_fields=("questions",))
    req = parsed.model
    if req.question is not None and req.questions is not None:
        raise BadRequest("send 'question' or 'questions', not both", param="question", code="invalid_question")
    task = engine.tasks.get(req.task) if req.task is not None else None
    if req.task is not None and task is None:
        known = ", ".join(sorted(engine.tasks)) or "none"
        raise BadRequest(f"unknown task; this model's tasks: {known}", param="task", code="unknown_task")
    if task is not None and req.question is None and req.questions is None and task.question:
        questions = [task.question]
    elif req.question is not None:
        questions = [check_question(req.question, state.limits, param="question")]
    else:
        raw = req.questions or []
        if not raw:
            raise BadRequest("no question: send 'question' or 'questions'", param="question", code="missing_question")
        check_counts(state.limits, questions=len(raw))
        questions = [check_question(q, state.limits, param=f"questions.{i}") for i, q in enumerate(raw)]
    config = generation_config(req, DEFAULT_MAX_NEW_TOKENS["vqa"])
    fields, _ = await image_job_fields(state, image_source(parsed))
    prompts = [engine.model_config.prompts.vqa_prompt(q) for q in questions]
    job = Job(prompts=prompts, config=config, task=req.task, **fields)  # no quality prompt: as trained
    try:
        result = await run_job(request, engine, job)
    except ClientGone:
        return disconnected()
    answers = [Answer(question=q, answer=g.text) for q, g in zip(questions, result.outputs)]
    return VQAResponse(answers=answers, usage=usage(result), timings=timings(result), model=engine.model_name)


@router.post("/v1/detect", response_model=DetectResponse, responses=_ERRORS, openapi_extra=_body_doc("DetectRequest"),
             summary="Detect objects (boxes written as location tokens)")
async def detect(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    cfg = engine.model_config
    if not cfg.num_loc_bins:
        raise BadRequest("this model has no location tokens, so it cannot detect objects", param=None,
                         code="detection_not_supported")
    engine.check_capacity()
    parsed = await read_body(request, DetectRequest, state.limits, list_fields=("labels",))
    req = parsed.model
    labels = [" ".join(label.split()) for label in req.labels] if req.labels else None
    default_tokens = min(MAX_NEW_TOKENS, DETECT_TOKENS_PER_OBJECT * (req.max_objects + 1))
    config = generation_config(req, default_tokens)
    fields, size = await image_job_fields(state, image_source(parsed))
    try:
        job = Job(prompts=[cfg.prompts.detect_prompt(labels)], config=config, **fields)
        result = await run_job(request, engine, job)
    except ClientGone:
        return disconnected()
    width, height = size or result.image_size
    g = result.outputs[0]
    found = BoxCodec(cfg.num_loc_bins).decode_tokens(g.tokens, g.logprobs, width, height)
    wanted = {label.lower() for label in labels} if labels else None
    kept = [d for d in found
            if (wanted is None or d.label.lower() in wanted) and (d.score or 0.0) >= req.score_threshold]
    kept.sort(key=lambda d: -(d.score or 0.0))
    detections = [
        Detection(label=d.label, score=round(d.score or 0.0, 6), box=[round(v, 2) for v in d.box],
                  box_normalized=[round(v, 6) for v in d.box_norm])
        for d in kept[: req.max_objects]
    ]
    return DetectResponse(sequence="".join(g.tokens), detections=detections,
                          image=ImageSize(width=width, height=height), usage=usage(result), timings=timings(result),
                          model=engine.model_name)


# --- alignment: the Q-Former's own heads, no LLM ---------------------------------------------------


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
             openapi_extra=_body_doc("ClassifyRequest"),
             summary="Zero-shot classification over given labels (ITC similarity, prompt ensembling)")
async def classify(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.require_alignment()
    engine.check_capacity()
    parsed = await read_body(request, ClassifyRequest, state.limits, list_fields=("labels", "templates"))
    req = parsed.model
    labels = align.check_labels(req.labels)
    templates = align.check_templates(req.templates)
    fields, _ = await image_job_fields(state, image_source(parsed))
    try:
        result = await run_job(request, engine, AlignJob("classify", labels, templates, req.ensemble, **fields))
    except ClientGone:
        return disconnected()
    ranked = sorted(zip(labels, result.scores["probability"]), key=lambda lp: -lp[1])
    return ClassifyResponse(labels=[LabelProbability(label=label, probability=round(p, 6)) for label, p in ranked],
                            templates=list(templates), ensemble=req.ensemble, timings=alignment_timings(result),
                            model=engine.model_name)


@router.post("/v1/match", response_model=MatchResponse, responses=_ERRORS, openapi_extra=_body_doc("MatchRequest"),
             summary="Image-text matching: ITM probability and ITC similarity per text")
async def match(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.require_alignment()
    engine.check_capacity()
    parsed = await read_body(request, MatchRequest, state.limits, list_fields=("texts",))
    texts = align.check_texts(parsed.model.texts)
    fields, _ = await image_job_fields(state, image_source(parsed))
    try:
        result = await run_job(request, engine, AlignJob("match", texts, **fields))
    except ClientGone:
        return disconnected()
    matches = [TextMatch(text=text, itm_probability=round(itm, 6), itc_similarity=round(itc, 6))
               for text, itm, itc in zip(texts, result.scores["itm"], result.scores["itc"])]
    return MatchResponse(matches=matches, timings=alignment_timings(result), model=engine.model_name)


@router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_ERRORS,
             openapi_extra=_body_doc("EmbeddingRequest", form=False),
             summary="OpenAI-compatible embeddings of texts and images in the Q-Former's ITC space")
async def embeddings(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.require_alignment()
    engine.check_capacity()
    if not _is_json(request):
        raise UnsupportedMediaType("the request body must be application/json", code="unsupported_media_type")
    req = await read_json(request, EmbeddingRequest)
    if req.model is not None and req.model != engine.model_name:
        raise NotFound("the requested model is not served here; GET /v1/models lists the model", param="model",
                       code="model_not_found")
    if req.dimensions is not None and req.dimensions != engine.embed_dim:
        raise BadRequest(f"this model's embeddings have {engine.embed_dim} dimensions; omit 'dimensions' or give "
                         f"{engine.embed_dim}", param="dimensions", code="unsupported_dimensions")
    checked = align.embedding_inputs(req.input, state.limits)  # 422/400 before anything is decoded
    params = align.input_params(req.input)
    inputs: list[tuple[str, Any]] = []
    for (kind, value), param in zip(checked, params):
        if kind == "data_url":
            try:
                loaded = await decode_image("image", value, state.limits, state.decode_limiter)
            except ServiceError as exc:
                exc.param = param  # the decoder names `image`; here the image is this input
                raise
            kind, value = "image", loaded.image
        inputs.append((kind, value))
    try:
        result = await run_job(request, engine, EmbedJob(inputs, params))
    except ClientGone:
        return disconnected()
    data = [Embedding(index=i, embedding=align.embedding_value(v, req.encoding_format))
            for i, v in enumerate(result.vectors)]
    return EmbeddingResponse(data=data, model=engine.model_name,
                             usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens,
                                                  total_tokens=result.prompt_tokens))


# --- encoded-image cache ---------------------------------------------------------------------------


def _image_info(entry, encode_ms: float) -> ImageInfo:
    return ImageInfo(image_id=entry.image_id, width=entry.width, height=entry.height, created_at=int(entry.created_at),
                     expires_at=int(entry.expires_at), encode_ms=round(encode_ms, 3))


@router.post("/v1/images", response_model=ImageInfo, responses=_ERRORS,
             openapi_extra=_body_doc("ImageUploadRequest"), summary="Encode an image once; ask about it by image_id")
async def upload_image(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.check_capacity()
    parsed = await read_body(request, ImageUploadRequest if _is_json(request) else _UploadForm, state.limits)
    kind, value = image_source(parsed)
    loaded = await decode_image(kind, value, state.limits, state.decode_limiter)
    try:
        async with engine.admit() as ticket:
            entry = await until_disconnect(request, engine.encode_image(ticket, loaded.image, loaded.original_size))
    except ClientGone:
        return disconnected()
    return _image_info(entry, ticket.timings.encode_ms)


@router.get("/v1/images/{image_id}", response_model=ImageInfo, responses=_ERRORS, summary="An uploaded image")
async def get_image(request: Request, image_id: str = Path(pattern=IMAGE_ID_PATTERN)):
    entry = app_state(request).require_engine().get_image(image_id)
    if entry is None:
        raise NotFound("unknown or expired image_id", param="image_id", code="image_not_found")
    return _image_info(entry, 0.0)


@router.delete("/v1/images/{image_id}", response_model=ImageDeleted, responses=_ERRORS,
               summary="Free an uploaded image")
async def delete_image(request: Request, image_id: str = Path(pattern=IMAGE_ID_PATTERN)):
    if not app_state(request).require_engine().delete_image(image_id):
        raise NotFound("unknown or expired image_id", param="image_id", code="image_not_found")
    return ImageDeleted(image_id=image_id, deleted=True)


def _is_json(request: Request) -> bool:
    ctype, _ = media_type(request)
    return ctype == b"application/json" or ctype.endswith(b"+json")


class _UploadForm(ImageUploadRequest):
    image: str | None = None  # multipart: the upload (`file` or `image`), or `image` as a text field


# --- OpenAI-compatible chat ------------------------------------------------------------------------


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**_ERRORS, 200: {"content": {"text/event-stream": {}}, "description":
                        "a chat.completion, or with stream=true a stream of chat.completion.chunk events"}},
             openapi_extra=_body_doc("ChatCompletionRequest", form=False), summary="OpenAI-compatible chat")
async def chat_completions(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    engine.check_capacity()
    if not _is_json(request):
        raise UnsupportedMediaType("the request body must be application/json", code="unsupported_media_type")
    req = await read_json(request, ChatCompletionRequest)
    if req.model is not None and req.model != engine.model_name:
        raise NotFound("the requested model is not served here; GET /v1/models lists the model", param="model",
                       code="model_not_found")
    url, text = chatmap.conversation(req.messages, state.limits)
    task, question = chatmap.task_for(text)
    prompts = engine.model_config.prompts
    if task == "vqa":
        question = check_question(question, state.limits, param="messages")
        prompt, quality = prompts.vqa_prompt(question), None
    else:
        prompt, quality = prompts.caption_prompt(), resolve_quality(engine, req.quality)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    params = GenerationParams(
        max_new_tokens=req.max_completion_tokens or req.max_tokens,
        strategy="sample" if req.temperature else "greedy",
        temperature=req.temperature or None, top_p=req.top_p if req.temperature else None, seed=req.seed,
    )
    config = generation_config(params, DEFAULT_MAX_NEW_TOKENS[task], stop=stop)
    if url[:5].lower() == "data:":
        fields, _ = await image_job_fields(state, ("image", url))
    else:
        raw = await fetch_image(url, state.settings.url_allowlist, state.limits,
                                timeout_s=state.settings.url_fetch_timeout_s)
        fields, _ = await image_job_fields(state, ("file", raw))
    try:
        result = await run_job(request, engine, Job(prompts=[prompt], config=config, quality=quality, **fields))
    except ClientGone:
        return disconnected()
    g = result.outputs[0]
    completion_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        stream = chatmap.sse_stream(completion_id, created, engine.model_name, g.text, g.finish_reason, usage(result),
                                    include_usage)
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    choice = ChatChoice(index=0, message=ChatResponseMessage(content=g.text), finish_reason=g.finish_reason)
    return ChatCompletionResponse(id=completion_id, created=created, model=engine.model_name, choices=[choice],
                                  usage=usage(result))


# --- models, health, metrics, playground -----------------------------------------------------------


@router.get("/v1/models", response_model=ModelList, responses=_ERRORS, summary="The served model and its options")
async def models(request: Request):
    state = app_state(request)
    engine = state.require_engine()
    cfg = engine.model_config
    levels = [QualityLevel(level=i, name=cfg.quality_name(i)) for i in range(cfg.num_quality_levels)]
    limits = state.limits
    caps = ModelCapabilities(
        quality_levels=levels, default_quality=(cfg.num_quality_levels - 1) if levels else None,
        detection=bool(cfg.num_loc_bins), num_loc_bins=cfg.num_loc_bins, alignment=engine.can_align,
        embedding_dim=engine.embed_dim, backend=engine.backend.name, device=engine.device,
        max_new_tokens=MAX_NEW_TOKENS,
        tasks=[TaskInfo(name=t.name, description=t.description, question=t.question, vectors=t.num_vectors,
                        figures=t.figures) for t in engine.tasks.values()],
        limits={"max_body_bytes": limits.max_body_bytes, "max_image_bytes": limits.max_image_bytes,
                "max_pixels": limits.max_pixels, "max_images": limits.max_images,
                "max_questions": limits.max_questions, "max_question_chars": limits.max_question_chars,
                "max_labels": MAX_LABELS, "max_templates": MAX_TEMPLATES, "max_match_texts": MAX_MATCH_TEXTS,
                "max_text_chars": MAX_TEXT_CHARS, "max_embedding_inputs": MAX_EMBEDDING_INPUTS},
    )
    card = ModelCard(id=engine.model_name, created=int(state.started_at), qbridge=caps)
    return ModelList(data=[card])


@router.get("/health/live", response_model=Health, summary="The process answers (no model involved)")
async def live():
    return Health(status="ok")


@router.get("/health/ready", response_model=Health, responses={503: _ERRORS[503]},
            summary="The model is loaded and warm, and the server is not draining")
async def ready(request: Request):
    state = app_state(request)
    if state.ready:
        return Health(status="ready")
    try:
        state.require_engine()  # raises the 503 that says why: loading, failed, draining
    except ServiceError as exc:
        return error_response(exc)
    return error_response(Overloaded("the server is shutting down", code="shutting_down",
                                     retry_after=state.settings.retry_after_s))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request):
    body, content_type = app_state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/", include_in_schema=False)
async def playground():
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

