"""The bridge across vision and LLM families; location rows; generation paths against their plain twins."""

import pytest
import torch

from qformer.generation import GenerationConfig, generate
from tests.tiny import scene, tiny_bridge

PROMPTS = ["a photo of", "", "question: how many shapes are there? answer:"]


def feats(bridge, processor, n=3):
    return bridge.encode_images(processor(images=[scene(i) for i in range(n)], return_tensors="pt").pixel_values)


@pytest.mark.parametrize("vision,llm", [("blip2", "llama"), ("clip", "qwen2"), ("siglip", "opt"), ("dinov2", "llama"),
                                         ("resnet", "llama")])
def test_families_generate(vision, llm):
    bridge, tok, proc = tiny_bridge(vision, llm)
    out = generate(bridge, tok, feats(bridge, proc), PROMPTS, config=GenerationConfig(max_new_tokens=6))
    assert len(out) == 3
    for g in out:
        assert len(g.token_ids) == len(g.logprobs) == len(g.tokens) <= 6
        assert all(lp <= 0 for lp in g.logprobs)
        assert g.finish_reason in ("stop", "length")


def test_conv_tower_tokens_carry_their_place():
    from qformer.bridge import position_embedding_2d

    bridge, tok, proc = tiny_bridge("resnet")
    f = feats(bridge, proc, 2)
    assert f.shape == (2, 16, 32)  # a 4x4 map of 32 channels, row-major
    # the same map at every place would give equal tokens; the position embedding tells them apart
    flat = torch.ones(1, 32, 4, 4)
    from qformer.bridge import feature_tokens

    tokens = feature_tokens(flat)[0]
    assert torch.cdist(tokens, tokens).add(torch.eye(16) * 9).min() > 0.1
    pe = position_embedding_2d(4, 4, 32)
    torch.testing.assert_close(tokens, 1 + pe)
    # rows live in the first half of the channels, columns in the second
    torch.testing.assert_close(pe[0, :16], pe[3, :16])  # same row 0, columns 0 and 3
    torch.testing.assert_close(pe[0, 16:], pe[12, 16:])  # same column 0, rows 0 and 3
    with pytest.raises(ValueError, match="divisible by 4"):
        position_embedding_2d(2, 2, 30)


@pytest.mark.parametrize("vision", ["resnet", "blip2"])
def test_the_serving_layout_keeps_the_features(vision):
    bridge, tok, proc = tiny_bridge(vision)
    before = feats(bridge, proc)
    bridge.serving_layout()
    convs = [m.weight for m in bridge.vision.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) == (vision == "resnet") for w in convs)
    torch.testing.assert_close(feats(bridge, proc), before, rtol=1e-4, atol=1e-5)


def test_only_trainable_parts_get_gradients():
    bridge, tok, proc = tiny_bridge(num_loc_bins=8, num_quality_levels=3)
    bridge.train()
    assert not bridge.vision.training and not bridge.llm.training
    f = feats(bridge, proc, 2)
    ids = torch.tensor([[1, 40, 50, len(tok) - 1], [1, 60, len(tok) - 8, 2]])  # includes location tokens
    out = bridge(f, ids, torch.ones_like(ids), quality=torch.tensor([0, 2]))
    out.logits.logsumexp(-1).sum().backward()
    names = {n for n, p in bridge.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"loc_embeddings", "loc_head", "quality_prompts", "language_projection.weight"} <= names
    assert all(n.split(".")[0] in bridge.TRAINABLE for n in names)
    assert not any(p.requires_grad for p in bridge.vision.parameters())
    base = bridge.llm.get_input_embeddings().base.weight
    assert not base.requires_grad and base.grad is None
    assert out.logits.shape == (2, 4, len(tok))


def test_location_rows_equal_a_resized_vocabulary():
    bridge, tok, proc = tiny_bridge(num_loc_bins=8)
    ids = torch.tensor([[1, 40, len(tok) - 3, len(tok) - 1]])
    emb = bridge.llm.get_input_embeddings()
    full = torch.nn.functional.embedding(ids, emb.weight)
    torch.testing.assert_close(emb(ids), full)
    h = torch.randn(2, 48)
    torch.testing.assert_close(bridge.llm.get_output_embeddings()(h), h @ bridge.llm.get_output_embeddings().weight.T)


def test_batched_generation_equals_one_row_at_a_time():
    bridge, tok, proc = tiny_bridge(num_loc_bins=8, num_quality_levels=3)
    f = feats(bridge, proc)
    cfg = GenerationConfig(max_new_tokens=10)
    quality = [2, 0, 1]
    batch = generate(bridge, tok, f, PROMPTS, quality, cfg)
    for i in range(3):
        (one,) = generate(bridge, tok, f[i : i + 1], PROMPTS[i : i + 1], quality[i : i + 1], cfg)
        assert one.token_ids == batch[i].token_ids
        assert one.logprobs == pytest.approx(batch[i].logprobs, abs=1e-4)


def test_kv_cache_decoding_matches_teacher_forcing():
    bridge, tok, proc = tiny_bridge(num_loc_bins=8, num_quality_levels=3)
    f = feats(bridge, proc, 1)
    (g,) = generate(bridge, tok, f, ["a photo of"], [1], GenerationConfig(max_new_tokens=8))
    prompt = tok(["a photo of"], return_tensors="pt").input_ids
    ids = torch.cat([prompt, torch.tensor([g.token_ids])], dim=1)
    logits = bridge(f, ids, torch.ones_like(ids), torch.tensor([1])).logits.log_softmax(-1)
    P = prompt.shape[1]
    # text position t predicts token t + 1; the first generated token comes from the last prompt position
    want = logits[0, P - 1 : P - 1 + len(g.token_ids)].gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
    assert len(g.token_ids) >= 3
    assert g.logprobs == pytest.approx(want.tolist(), abs=1e-4)
    # greedy: every chosen token is the argmax of the plain forward
    assert g.token_ids == logits[0, P - 1 : P - 1 + len(g.token_ids)].argmax(-1).tolist()


def test_beam_sampling_and_stop_strings():
    bridge, tok, proc = tiny_bridge()
    f = feats(bridge, proc)
    beam = generate(bridge, tok, f, PROMPTS, config=GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=6))
    assert all(len(b.token_ids) == len(b.logprobs) for b in beam)
    s1 = generate(bridge, tok, f, PROMPTS, config=GenerationConfig(strategy="sample", seed=3, max_new_tokens=6))
    s2 = generate(bridge, tok, f, PROMPTS, config=GenerationConfig(strategy="sample", seed=3, max_new_tokens=6))
    assert [a.token_ids for a in s1] == [b.token_ids for b in s2]
    free = generate(bridge, tok, f, PROMPTS, config=GenerationConfig(max_new_tokens=12))
    row = next(g for g in free if len(g.text) > 4)
    stop = row.text[2:4]
    i = free.index(row)
    (cut,) = generate(bridge, tok, f[i : i + 1], PROMPTS[i : i + 1], config=GenerationConfig(max_new_tokens=12, stop=(stop,)))
    assert stop not in cut.text and cut.finish_reason == "stop"
    assert row.text.startswith(cut.text)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes quantisation needs a CUDA GPU")
def test_llm_loads_in_8bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    from qformer.bridge import load_llm
    from tests.tiny import tiny_llm, tiny_tokenizer

    tiny_llm("llama", tiny_tokenizer()).save_pretrained(tmp_path / "llm")
    llm = load_llm(str(tmp_path / "llm"), "8bit", device_map={"": 0})
    assert llm.get_memory_footprint() > 0
