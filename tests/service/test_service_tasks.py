"""Task prompts in the service: a /v1/vqa request picks one by `task`; /v1/models lists them;
service/BAD_INPUTS.md row 28. The answer is the one the bridge gives with the task's vectors after the queries."""

from __future__ import annotations

import base64

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import assert_envelope, encode, make_app, qformer_tokenizer, scene_image
from service import protocol

QUESTION = "which colour is the largest object?"


@pytest.fixture(scope="module")
def tasked(tmp_path_factory):
    from qformer.bundle import load_bundle, save_bundle
    from qformer.tasks import TaskPrompt, save_task
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge(num_quality_levels=3)  # no location rows: the random LLM writes words
    path = save_bundle(bridge, tok, proc, tmp_path_factory.mktemp("tasked") / "tiny", qformer_tokenizer=qformer_tokenizer())
    vectors = torch.randn(3, bridge.llm.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 10
    save_task(path, TaskPrompt("largest-colour", vectors, "the colour of the largest object", QUESTION,
                               {"accuracy_before": 0.1, "accuracy_after": 0.9, "trained_parameters": vectors.numel()}))
    bundle = load_bundle(path)
    with TestClient(make_app(bundle)) as client:
        yield bundle, client


def image_b64(seed=0) -> str:
    return base64.b64encode(encode(scene_image(seed=seed))).decode()


def expected(bundle, image, prompt, vectors):
    import io

    from PIL import Image

    from qformer.generation import GenerationConfig, decode_from_queries
    from qformer.tasks import with_task

    pixels = bundle.image_processor(images=[Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")],
                                    return_tensors="pt").pixel_values
    with torch.no_grad():
        q = bundle.bridge.project_queries(bundle.bridge.encode_images(pixels))
        (g,) = decode_from_queries(bundle.bridge, bundle.tokenizer, with_task(q, vectors), [prompt], None,
                                   GenerationConfig(max_new_tokens=10))
    return g.text


def test_models_lists_the_tasks(tasked):
    _, client = tasked
    (card,) = protocol.ModelList.model_validate(client.get("/v1/models").json()).data
    (task,) = card.qbridge.tasks
    assert (task.name, task.question, task.vectors) == ("largest-colour", QUESTION, 3)
    assert task.figures["accuracy_after"] == 0.9


def test_a_task_answers_its_own_question_through_its_vectors(tasked):
    bundle, client = tasked
    image = image_b64()
    task = bundle.tasks["largest-colour"]
    prompt = bundle.config.prompts.vqa_prompt(QUESTION)
    with_task = client.post("/v1/vqa", json={"image": image, "task": "largest-colour"})
    assert with_task.status_code == 200, with_task.text
    out = protocol.VQAResponse.model_validate(with_task.json())
    assert out.answers[0].question == QUESTION
    assert out.answers[0].answer == expected(bundle, image, prompt, task.vectors)
    plain = protocol.VQAResponse.model_validate(client.post("/v1/vqa", json={"image": image, "question": QUESTION}).json())
    assert plain.answers[0].answer == expected(bundle, image, prompt, None)
    assert out.answers[0].answer != plain.answers[0].answer  # the vectors change what the LLM reads
    assert out.usage.prompt_tokens == plain.usage.prompt_tokens + task.num_vectors


def test_a_task_with_an_asked_question_and_a_cached_image(tasked):
    bundle, client = tasked
    image = image_b64(1)
    image_id = client.post("/v1/images", json={"image": image}).json()["image_id"]
    r = client.post("/v1/vqa", json={"image_id": image_id, "task": "largest-colour", "questions": ["what is it?", QUESTION]})
    assert r.status_code == 200, r.text
    vectors = bundle.tasks["largest-colour"].vectors
    answers = [a["answer"] for a in r.json()["answers"]]
    assert answers == [expected(bundle, image, bundle.config.prompts.vqa_prompt(q), vectors) for q in ("what is it?", QUESTION)]


def test_an_unknown_task_is_400_and_names_the_known_ones(tasked):
    _, client = tasked
    err = assert_envelope(client.post("/v1/vqa", json={"image": image_b64(), "task": "nope", "question": "q?"}),
                          400, "unknown_task")
    assert err["param"] == "task" and "largest-colour" in err["message"]
    assert_envelope(client.post("/v1/vqa", json={"image": image_b64(), "task": 5, "question": "q?"}), 422)
    assert_envelope(client.post("/v1/vqa", json={"image": image_b64(), "task": "x" * 65, "question": "q?"}), 422)


def test_a_bundle_without_tasks_refuses_every_task(tmp_path):
    from qformer.bundle import load_bundle, save_bundle
    from tests.tiny import tiny_bridge

    bridge, tok, proc = tiny_bridge()
    plain = load_bundle(save_bundle(bridge, tok, proc, tmp_path / "plain"))
    with TestClient(make_app(plain)) as client:
        assert client.get("/v1/models").json()["data"][0]["qbridge"]["tasks"] == []
        err = assert_envelope(client.post("/v1/vqa", json={"image": image_b64(), "task": "largest-colour"}),
                              400, "unknown_task")
        assert "none" in err["message"]
