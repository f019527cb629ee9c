"""Parity with transformers' BLIP-2 on tiny random weights: same Q-Former outputs, same greedy tokens."""

import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2QFormerModel,
)

from qformer.bundle import load_bundle
from qformer.cli import caption_main
from qformer.config import QFormerConfig
from qformer.generation import GenerationConfig, decode_from_queries, generate
from qformer.hf_interop import convert, convert_main, export_hf, qformer_config_from_hf
from qformer.prompts import PRESETS
from qformer.qformer import AttentionMode, QFormer
from tests.tiny import save_tiny_blip2, scene

PROMPTS = ["", "question: what colour is the circle? answer:", "a photo of"]


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])  # the config's activation is the one run
def test_qformer_matches_transformers(act):
    torch.manual_seed(0)
    hf_cfg = Blip2QFormerConfig(
        hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, encoder_hidden_size=20,
        hidden_act=act,
    )
    hf = Blip2QFormerModel(hf_cfg).eval()
    ours = QFormer(qformer_config_from_hf(hf_cfg, num_query_tokens=7)).eval()
    state = dict(hf.state_dict(), query_tokens=torch.randn(1, 7, 36))
    ours.load_state_dict(state, strict=True)
    image = torch.randn(3, 11, 20)
    got = ours(AttentionMode.QUERIES, image_embeds=image).query_output
    want = hf(
        query_embeds=state["query_tokens"].expand(3, -1, -1),
        encoder_hidden_states=image,
        encoder_attention_mask=torch.ones(3, 11, dtype=torch.long),
    ).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5


def hf_inputs(tokenizer, num_queries, image_token, prompts):
    rows = [[image_token] * num_queries + tokenizer(p).input_ids for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def hf_greedy(model, tokenizer, images, prompts, max_new_tokens):
    pixel_values = _pixels(images)
    ids, mask = hf_inputs(tokenizer, model.config.num_query_tokens, model.config.image_token_index, prompts)
    out = model.generate(
        pixel_values=pixel_values, input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
        do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    new = out[:, ids.shape[1] :]
    result = []
    for row in new.tolist():
        result.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return result


def _pixels(images):
    from tests.tiny import tiny_image_processor

    return tiny_image_processor()(images=images, return_tensors="pt").pixel_values


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model, tokenizer = save_tiny_blip2(root / "blip2")
    bundle_dir = convert(str(root / "blip2"), root / "bundle")
    return model, tokenizer, bundle_dir, root


def test_convert_then_greedy_matches_transformers(converted):
    model, tokenizer, bundle_dir, _ = converted
    bundle = load_bundle(bundle_dir)
    images = [scene(i) for i in range(3)]
    want = hf_greedy(model, tokenizer, images, PROMPTS, max_new_tokens=12)
    feats = bundle.bridge.encode_images(bundle.image_processor(images=images, return_tensors="pt").pixel_values)
    got = generate(bundle.bridge, bundle.tokenizer, feats, PROMPTS, config=GenerationConfig(max_new_tokens=12))
    assert [g.token_ids for g in got] == want
    assert any(len(w) >= 5 for w in want)  # the comparison covers real decoding, not an instant EOS
    queries = bundle.bridge.project_queries(feats)
    ours = decode_from_queries(bundle.bridge, bundle.tokenizer, queries, PROMPTS,
                               config=GenerationConfig(max_new_tokens=12))
    assert [g.token_ids for g in ours] == want  # our decode loop, token for token


def test_export_round_trips(converted):
    model, tokenizer, bundle_dir, root = converted
    out = export_hf(bundle_dir, root / "exported")
    again = Blip2ForConditionalGeneration.from_pretrained(out, use_safetensors=True).eval()
    original = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, original[k]), k
    assert set(again.state_dict()) == set(original)


# --- a converted BLIP-2 asks BLIP-2's prompts -------------------------------------------------------------


def blip2_greedy(model, checkpoint, image, question: str | None = None, max_new_tokens: int = 30) -> list[int]:
    """transformers' greedy tokens the way BLIP-2 documents the call: its processor, no text for a caption,
    "Question: {q} Answer:" for a question, then `generate` (cut at EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = Blip2Processor(AutoImageProcessor.from_pretrained(checkpoint), tokenizer,
                               num_query_tokens=model.config.num_query_tokens)
    if question is None:
        inputs = processor(images=image, return_tensors="pt")
        prompt_len = model.config.num_query_tokens + 1  # generate starts from the image tokens and BOS
    else:
        inputs = processor(images=image, text=f"Question: {question} Answer:", return_tensors="pt")
        prompt_len = inputs["input_ids"].shape[1]
    new = model.generate(**inputs, max_new_tokens=max_new_tokens)[0, prompt_len:].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def decoded(checkpoint, ids: list[int]) -> str:
    return AutoTokenizer.from_pretrained(checkpoint).decode(ids, skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def converted_opt(tmp_path_factory):
    """(model, checkpoint dir, bundle dir): a tiny BLIP-2 with an OPT LLM, as released, through `qbridge convert`."""
    root = tmp_path_factory.mktemp("hf-opt")
    model, _ = save_tiny_blip2(root / "blip2", llm="opt")
    assert convert_main(["--from-hf-blip2", str(root / "blip2"), "--out", str(root / "bundle")]) == 0
    return model, root / "blip2", root / "bundle"


def test_converted_blip2_asks_blip2s_prompts_as_transformers_does(converted_opt):
    model, checkpoint, bundle_dir = converted_opt
    bundle = load_bundle(bundle_dir)
    prompts = bundle.config.prompts
    assert prompts == PRESETS["blip2-opt"] and prompts.caption_prompt() == ""
    image = scene(0)
    feats = bundle.bridge.encode_images(bundle.image_processor(images=[image], return_tensors="pt").pixel_values)
    config = GenerationConfig(max_new_tokens=30)
    (caption,) = generate(bundle.bridge, bundle.tokenizer, feats, [prompts.caption_prompt()], config=config)
    want = blip2_greedy(model, checkpoint, image)
    assert caption.token_ids == want and len(want) >= 5
    question = "what colour is the circle?"
    (answer,) = generate(bundle.bridge, bundle.tokenizer, feats, [prompts.vqa_prompt(question)], config=config)
    assert answer.token_ids == blip2_greedy(model, checkpoint, image, question)
    queries = bundle.bridge.project_queries(feats)
    ours = decode_from_queries(bundle.bridge, bundle.tokenizer, queries.expand(2, -1, -1),
                               [prompts.caption_prompt(), prompts.vqa_prompt(question)], config=config)
    assert [g.token_ids for g in ours] == [want, answer.token_ids]  # our decode loop, token for token


def test_qbridge_caption_on_a_converted_blip2_matches_transformers(converted_opt, tmp_path, capsys):
    model, checkpoint, bundle_dir = converted_opt
    path = tmp_path / "scene.png"
    scene(1).save(path)
    assert caption_main([str(path), "--model", str(bundle_dir)]) == 0  # no prompt flag: the bundle's own
    with Image.open(path) as im:
        want = blip2_greedy(model, checkpoint, im.convert("RGB"), max_new_tokens=30)  # the CLI's default
    assert capsys.readouterr().out == decoded(checkpoint, want) + "\n"
