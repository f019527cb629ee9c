"""Properties of the Q-Former's attention modes and heads."""

import torch

from qformer.config import QFormerConfig
from qformer.qformer import AttentionMode, QFormer, build_attention_mask

CFG = QFormerConfig(hidden_size=36, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                    encoder_hidden_size=20, num_query_tokens=5, vocab_size=97, embed_dim=11)


def model():
    torch.manual_seed(0)
    m = QFormer(CFG).eval()
    with torch.no_grad():
        m.query_tokens.normal_(0, 1.0)
    return m


def inputs(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 11, 20, generator=g), torch.randint(1, 97, (B, T), generator=g)


def test_causal_mask_shape_of_itg():
    mask = build_attention_mask(AttentionMode.CAUSAL, 4, torch.ones(1, 6))[0, 0]
    assert mask[:4, :4].all() and not mask[:4, 4:].any()  # queries see queries, never text
    assert mask[4:, :4].all()  # text sees every query
    text = mask[4:, 4:]
    assert torch.equal(text, torch.tril(torch.ones(6, 6, dtype=torch.bool)))  # and text <= t only


def test_itg_text_never_sees_later_tokens_and_queries_never_see_text():
    m = model()
    image, ids = inputs()
    base = m(AttentionMode.CAUSAL, image, ids)
    for t in range(ids.shape[1]):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 13) % 96 + 1
        out = m(AttentionMode.CAUSAL, image, changed)
        torch.testing.assert_close(out.query_output, base.query_output, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.text_output[:, :t], base.text_output[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(out.text_output[:, t], base.text_output[:, t])


def test_queries_only_output_is_independent_of_text():
    m = model()
    image, ids = inputs()
    alone = m(AttentionMode.QUERIES, image).query_output
    causal = m(AttentionMode.CAUSAL, image, ids).query_output
    torch.testing.assert_close(alone, causal, rtol=0, atol=1e-6)
    # Bidirectional is the mode where text does reach the queries: the check above can fail.
    bidir = m(AttentionMode.BIDIRECTIONAL, image, ids).query_output
    assert (bidir - alone).abs().max() > 1e-3


def test_rows_do_not_depend_on_batch_or_padding():
    m = model()
    image, ids = inputs(B=3, T=7)
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    for mode in (AttentionMode.TEXT, AttentionMode.BIDIRECTIONAL, AttentionMode.CAUSAL):
        full = m(mode, image, ids, mask)
        padded = m(mode, image, padded_ids, padded_mask)
        torch.testing.assert_close(padded.text_output[:, :7], full.text_output, atol=1e-5, rtol=0)
        for i in range(3):
            one = m(mode, image[i : i + 1], ids[i : i + 1], mask[i : i + 1])
            torch.testing.assert_close(one.text_output, full.text_output[i : i + 1], atol=1e-5, rtol=0)
            if one.query_output is not None:
                torch.testing.assert_close(one.query_output, full.query_output[i : i + 1], atol=1e-5, rtol=0)


def test_heads_shapes():
    m = model()
    image, ids = inputs()
    q = m(AttentionMode.QUERIES, image).query_output
    t = m(AttentionMode.TEXT, None, ids).text_output
    zi, zt = m.image_features(q), m.text_features(t)
    assert zi.shape == (3, 5, 11) and zt.shape == (3, 11)
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(3, 5))
    sim = m.similarity(zi, zt)
    assert sim.shape == (3, 3) and sim.abs().max() <= 1 + 1e-6
    assert m.itm_logits(m(AttentionMode.BIDIRECTIONAL, image, ids).query_output).shape == (3, 2)
    assert m.lm_logits(m(AttentionMode.CAUSAL, image, ids).text_output).shape == (3, 7, 97)
