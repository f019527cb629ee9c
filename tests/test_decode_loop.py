"""Our decode loop (`qformer.generation.Decoder`) against its plain twin, transformers' `generate`.

    .venv/bin/python -m pytest tests/test_decode_loop.py -q

Greedy tokens and their log-probs must equal `generate_from_queries`; rows that join a running batch,
leave it early or outlive a shift of the cache columns must get the tokens they get alone.
"""

import pytest
import torch

from qformer.generation import (
    Decoder,
    GenerationConfig,
    Sequence,
    decode_from_queries,
    generate_from_queries,
    prepare_inputs,
    row_embeddings,
)
from tests.tiny import scene, tiny_bridge

PROMPTS = ["", "question: what colour is the circle? answer:", "a photo of"]


def queries(bridge, proc, n=3):
    feats = bridge.encode_images(proc(images=[scene(i) for i in range(n)], return_tensors="pt").pixel_values)
    return bridge.project_queries(feats)


@pytest.fixture(scope="module", params=["llama", "opt", "qwen2"])
def model(request):
    bridge, tok, proc = tiny_bridge(llm_kind=request.param, num_loc_bins=8, num_quality_levels=3)
    bridge.eval()
    with torch.no_grad():
        return bridge, tok, queries(bridge, proc)


def assert_same(got, want, atol=0.0):
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.finish_reason for g in got] == [w.finish_reason for w in want]
    for g, w in zip(got, want):
        assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=atol, rtol=0)


@pytest.mark.parametrize("config, quality", [
    (GenerationConfig(max_new_tokens=12), None),
    (GenerationConfig(max_new_tokens=12), [0, 2, 1]),
    (GenerationConfig(max_new_tokens=12, repetition_penalty=1.3), None),
    (GenerationConfig(max_new_tokens=1), [1, 1, 1]),
])
def test_greedy_equals_transformers_generate(model, config, quality):
    bridge, tok, q = model
    want = generate_from_queries(bridge, tok, q, PROMPTS, quality, config)
    assert_same(decode_from_queries(bridge, tok, q, PROMPTS, quality, config), want, atol=1e-5)
    assert all(len(w.token_ids) == config.max_new_tokens for w in want)  # real decoding, not an instant EOS


def test_stop_strings_cut_as_transformers_does(model):
    bridge, tok, q = model
    plain = generate_from_queries(bridge, tok, q, PROMPTS, None, GenerationConfig(max_new_tokens=12))
    stop = plain[1].text[len(plain[1].text) // 2:][:2]  # two characters from the middle of row 1's text
    config = GenerationConfig(max_new_tokens=12, stop=(stop,))
    want = generate_from_queries(bridge, tok, q, PROMPTS, None, config)
    got = decode_from_queries(bridge, tok, q, PROMPTS, None, config)
    assert_same(got, want, atol=1e-5)
    assert got[1].finish_reason == "stop" and stop not in got[1].text


def test_rows_joining_and_leaving_a_running_batch_get_their_solo_tokens(model):
    """Row 0 runs alone, row 1 joins (row 0 must move right to make room for the longer prompt), row 2
    joins later and row 0 is cancelled; the cache has just the columns the longest row needs, so the
    columns are shifted left while rows 1 and 2 run."""
    bridge, tok, q = model
    config = GenerationConfig(max_new_tokens=12)
    solo = [decode_from_queries(bridge, tok, q[i : i + 1], [p], None, config)[0] for i, p in enumerate(PROMPTS)]
    rows = row_embeddings(prepare_inputs(bridge, tok, q, PROMPTS))
    lengths = [r.shape[0] for r in rows]
    assert lengths[0] + 2 < lengths[1] and lengths[2] <= lengths[1]
    decoder = Decoder(bridge, tok, max_rows=3, max_len=max(lengths) + config.max_new_tokens)
    seqs = [Sequence(config, n) for n in lengths]
    decoder.add(rows[:1], seqs[:1])
    decoder.step()
    decoder.add(rows[1:2], seqs[1:2])
    assert decoder.t == lengths[1] and seqs[0].start == lengths[1] - lengths[0] - 1  # moved right
    for _ in range(3):
        decoder.step()
    decoder.add(rows[2:], seqs[2:])
    decoder.step()
    decoder.remove(seqs[0])
    assert decoder.running == [seqs[2], seqs[1]] and [s.row for s in decoder.running] == [0, 1]
    shifted = False
    while decoder.running:
        shifted |= decoder.t == decoder.max_len
        decoder.step()
    assert shifted
    assert seqs[1].ids == solo[1].token_ids and seqs[2].ids == solo[2].token_ids
    assert len(seqs[0].ids) == 6 and seqs[0].ids == solo[0].token_ids[:6]
    for s, w in zip(seqs, solo):
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(w.logprobs[: len(s.logprobs)]), atol=1e-4)


def test_rows_that_start_from_a_kept_prefix_get_their_solo_tokens(model):
    """Three questions about one image, `[quality][queries]` computed once: two rows join from the prefix
    (one with a tail shorter than the forward's, so its padding falls on the prefix's columns) beside a
    row given whole, while another image's row is running."""
    bridge, tok, q = model
    config = GenerationConfig(max_new_tokens=8)
    same = q[:1].expand(3, *q.shape[1:])
    quality = [1, 1, 1]
    solo = decode_from_queries(bridge, tok, same, PROMPTS, quality, config)
    rows = row_embeddings(prepare_inputs(bridge, tok, same, PROMPTS, quality))
    prefix_len = bridge.cfg.quality_prompt_len + q.shape[1]
    decoder = Decoder(bridge, tok, max_rows=4, max_len=128)
    prefix = decoder.prefill_prefix(rows[0][:prefix_len])
    again = decoder.prefill_prefix(rows[2][:prefix_len])  # the same positions under another prompt
    assert prefix.length == prefix_len and torch.equal(prefix.keys[0], again.keys[0])
    other = row_embeddings(prepare_inputs(bridge, tok, q[1:2], PROMPTS[:1], [2]))
    decoder.add(other, [Sequence(config, other[0].shape[0])])
    decoder.step()
    seqs = [Sequence(config, r.shape[0]) for r in rows]
    decoder.add([rows[0][prefix_len:], rows[1], rows[2][prefix_len:]], seqs, [prefix, None, prefix])
    while decoder.running:
        decoder.step()
    for s, w in zip(seqs, solo):
        assert s.ids == w.token_ids
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(w.logprobs), atol=1e-4)
    with pytest.raises(ValueError, match="after its prefix"):
        decoder.add([rows[0][:0]], [Sequence(config, prefix_len)], [prefix])


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    bridge, tok, q = model
    config = GenerationConfig(max_new_tokens=10, strategy="sample", temperature=1.5, top_p=0.9, top_k=20, seed=5)
    together = decode_from_queries(bridge, tok, q, PROMPTS, None, config)
    again = decode_from_queries(bridge, tok, q, PROMPTS, None, config)
    assert [g.token_ids for g in together] == [g.token_ids for g in again]
    first = decode_from_queries(bridge, tok, q[:1], PROMPTS[:1], None, config)
    assert first[0].token_ids == together[0].token_ids  # row 0 draws from seed 5 in any batch
    other = decode_from_queries(bridge, tok, q, PROMPTS, None, GenerationConfig(**{**config.__dict__, "seed": 6}))
    assert [g.token_ids for g in other] != [g.token_ids for g in together]


def test_a_row_that_does_not_fit_is_refused(model):
    bridge, tok, q = model
    rows = row_embeddings(prepare_inputs(bridge, tok, q[:1], PROMPTS[:1]))
    decoder = Decoder(bridge, tok, max_rows=1, max_len=rows[0].shape[0] + 3)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.add(rows, [Sequence(GenerationConfig(max_new_tokens=4), rows[0].shape[0])])
    decoder.add(rows, [Sequence(GenerationConfig(max_new_tokens=3), rows[0].shape[0])])
    with pytest.raises(ValueError, match="free"):
        decoder.add(rows, [Sequence(GenerationConfig(max_new_tokens=3), rows[0].shape[0])])


def test_a_llama_decodes_through_the_written_out_step_and_others_through_transformers(model):
    bridge, tok, q = model
    fast = Decoder(bridge, tok, 2, 64).fast
    assert (fast is not None) == (bridge.llm.config.model_type == "llama")
    assert Decoder(bridge, tok, 2, 64, plain=True).fast is None


def test_the_written_out_step_gives_the_plain_forwards_tokens_and_logprobs(model):
    bridge, tok, q = model
    if bridge.llm.config.model_type != "llama":
        pytest.skip("the written-out step is Llama's")
    config = GenerationConfig(max_new_tokens=12)
    rows = row_embeddings(prepare_inputs(bridge, tok, q, PROMPTS, None))
    got = {}
    for plain in (True, False):
        decoder = Decoder(bridge, tok, len(rows), 64, plain=plain)
        seqs = [Sequence(config, r.shape[0]) for r in rows]
        decoder.add(rows[:2], seqs[:2])  # the third joins a running batch
        decoder.step()
        decoder.add(rows[2:], seqs[2:])
        while decoder.running:
            decoder.step()
        got[plain] = seqs
    assert [s.ids for s in got[True]] == [s.ids for s in got[False]]
    for a, b in zip(got[True], got[False]):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_fusing_the_projections_keeps_one_copy_and_the_models_own_forward():
    from qformer.llama_step import LlamaStep

    bridge, tok, proc = tiny_bridge(llm_kind="llama")
    llm = bridge.llm.eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        before = llm(input_ids=ids).logits
        n_before = sum(p.numel() for p in llm.parameters())
        step = LlamaStep(llm)
        after = llm(input_ids=ids).logits
    assert torch.equal(before, after)
    assert sum(p.numel() for p in llm.parameters()) == n_before
    attn = llm.model.layers[0].self_attn
    fused = step.layers[0][2]
    assert attn.q_proj.weight.data_ptr() == fused.data_ptr()  # q, k, v are views of the fused weight
    assert attn.k_proj.weight.data_ptr() == fused[attn.q_proj.out_features:].data_ptr()


def test_layers_that_are_not_plain_linears_take_the_plain_forward():
    from qformer.llama_step import unsupported

    bridge, _, _ = tiny_bridge(llm_kind="llama")
    assert unsupported(bridge.llm) is None

    class QuantisedLinear(torch.nn.Linear):  # what bitsandbytes' Linear8bitLt / Linear4bit look like
        pass

    attn = bridge.llm.model.layers[1].self_attn
    old = attn.v_proj
    attn.v_proj = QuantisedLinear(old.in_features, old.out_features, bias=False)
    assert "QuantisedLinear" in unsupported(bridge.llm)
    opt, _, _ = tiny_bridge(llm_kind="opt")
    assert "not llama" in unsupported(opt.llm)


@pytest.mark.parametrize("extra", [{}, {"attention_bias": True, "mlp_bias": True},
                                   {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}])
def test_the_written_out_step_equals_llamas_forward(extra):
    import transformers as T

    from qformer.generation import SlotCache
    from qformer.llama_step import LlamaStep

    torch.manual_seed(0)
    llm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, **extra)).eval()
    for p in llm.parameters():  # biases start at zero: make them count
        p.data.normal_(0, 0.2)
    ids = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        want = llm(input_ids=ids).logits[:, -1]
        cache = SlotCache(2, 1, 8)
        cache.rows, cache.columns, cache.window = slice(0, 1), torch.arange(6), slice(0, 6)
        mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None]
        got = LlamaStep(llm)(llm.get_input_embeddings()(ids), mask, torch.arange(6)[None], cache)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
