"""The Q-Former's own heads (qformer.alignment) against the same heads called one piece at a time."""

import dataclasses

import pytest
import torch

from qformer import alignment
from qformer.bridge import Alignment, Bridge
from qformer.qformer import AttentionMode
from tests.tiny import tiny_bridge


@pytest.fixture(scope="module")
def parts():
    bridge, tok, _ = tiny_bridge()
    tok.padding_side = "right"  # the [CLS] feature sits at position 0, as in training
    torch.manual_seed(3)
    feats = torch.randn(2, 7, bridge.cfg.vision_hidden_size)
    return bridge, tok, feats


def one_text(bridge, tok, text):
    ids = tok([text], return_tensors="pt").input_ids
    return bridge.qformer.text_features(bridge.qformer(AttentionMode.TEXT, input_ids=ids).text_output)


def test_classify_is_the_softmax_of_itc_similarity_at_the_learned_temperature(parts):
    bridge, tok, feats = parts
    labels = ["red circle", "blue square", "star"]
    probs = alignment.classify(bridge, tok, feats, labels)
    image = bridge.qformer.image_features(bridge.query_output(feats))
    texts = torch.cat([one_text(bridge, tok, f"a photo of a {label}.") for label in labels])
    want = (bridge.qformer.similarity(image, texts) / bridge.qformer.temp).softmax(-1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_prompt_ensembling_averages_each_labels_text_features(parts):
    bridge, tok, feats = parts
    templates = ("a photo of a {}.", "there is a {}")
    probs = alignment.classify(bridge, tok, feats, ["circle", "square"], templates)
    mean = lambda label: torch.nn.functional.normalize(  # noqa: E731
        torch.cat([one_text(bridge, tok, t.format(label)) for t in templates]).mean(0), dim=-1)
    labels = torch.stack([mean("circle"), mean("square")])
    image = bridge.qformer.image_features(bridge.query_output(feats))
    want = (bridge.qformer.similarity(image, labels) / bridge.qformer.temp).softmax(-1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probs, alignment.classify(bridge, tok, feats, ["circle", "square"]), atol=1e-4)


def test_the_max_ensemble_scores_each_label_by_its_best_template(parts):
    bridge, tok, feats = parts
    templates = ("a photo of a {}.", "there is a {}", "a red {}")
    probs = alignment.classify(bridge, tok, feats, ["circle", "square"], templates, ensemble="max")
    image = bridge.qformer.image_features(bridge.query_output(feats))
    sims = torch.stack([bridge.qformer.similarity(image, torch.cat([one_text(bridge, tok, t.format(label))
                                                                   for label in ("circle", "square")]))
                        for t in templates])  # (T, B, L)
    want = (sims.amax(0) / bridge.qformer.temp).softmax(-1)
    torch.testing.assert_close(probs, want, atol=1e-5, rtol=1e-5)
    mean = alignment.classify(bridge, tok, feats, ["circle", "square"], templates)
    assert not torch.allclose(probs, mean, atol=1e-4)
    # one template: the two ensembles are the same
    torch.testing.assert_close(alignment.classify(bridge, tok, feats, ["circle", "square"], templates[:1], "max"),
                               alignment.classify(bridge, tok, feats, ["circle", "square"], templates[:1]))
    with pytest.raises(ValueError, match="ensemble"):
        alignment.classify(bridge, tok, feats, ["circle"], templates, ensemble="median")


def test_the_service_offers_the_librarys_ensembles(tmp_path):
    """The request schema and the stdlib client name the ensembles qformer.alignment computes, no other."""
    import typing

    from service import cli, protocol

    assert typing.get_args(protocol.ClassifyRequest.model_fields["ensemble"].annotation) == alignment.ENSEMBLES
    image = tmp_path / "x.png"
    image.write_bytes(b"not sent")
    closed = ["--url", "http://127.0.0.1:9", "--timeout", "2"]
    for ensemble in alignment.ENSEMBLES:  # past argparse: the request itself fails (nothing listens)
        assert cli.classify_main([str(image), "--labels", "a", "--ensemble", ensemble, *closed]) == 1
    with pytest.raises(SystemExit):  # argparse refuses a value outside its choices before any request
        cli.classify_main([str(image), "--labels", "a", "--ensemble", "median", *closed])


def test_match_scores_every_pair_as_one_pair_at_a_time(parts):
    bridge, tok, feats = parts
    texts = ["a red circle", "two blue squares and a star"]
    got = alignment.match(bridge, tok, feats, texts)
    assert got["itm"].shape == got["itc"].shape == (2, 2)
    for i in range(2):
        image = bridge.ln_vision(feats[i: i + 1])
        for j, text in enumerate(texts):
            ids = tok([text], return_tensors="pt").input_ids
            joint = bridge.qformer(AttentionMode.BIDIRECTIONAL, image_embeds=image, input_ids=ids)
            itm = bridge.qformer.itm_logits(joint.query_output).softmax(-1)[0, 1]
            assert got["itm"][i, j].item() == pytest.approx(itm.item(), abs=1e-5)
            itc = bridge.qformer.similarity(bridge.qformer.image_features(bridge.query_output(feats[i: i + 1])),
                                            one_text(bridge, tok, text))
            assert got["itc"][i, j].item() == pytest.approx(itc.item(), abs=1e-5)


def test_embeddings_are_unit_vectors_of_one_dimension(parts):
    bridge, tok, feats = parts
    texts = alignment.text_embeddings(bridge, tok, ["a red circle", "a star"])
    images = alignment.image_embeddings(bridge, feats)
    assert texts.shape[1] == images.shape[1] == bridge.cfg.qformer.embed_dim
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))


def test_a_bridge_without_a_text_branch_is_refused_with_a_clear_error(parts):
    _, tok, feats = parts
    bridge, _, _ = tiny_bridge(with_text=False)
    with pytest.raises(alignment.NoTextBranch, match="no text branch"):
        alignment.classify(bridge, tok, feats, ["circle"])
    with pytest.raises(alignment.NoTextBranch, match="qformer_tokenizer"):
        alignment.match(parts[0], None, feats, ["circle"])


def test_the_stage1_copy_answers_when_the_bridge_carries_one(parts):
    bridge, tok, feats = parts
    cfg = bridge.cfg.replace(alignment_qformer=True, qformer=dataclasses.replace(bridge.cfg.qformer, with_text=False))
    carrier = Bridge(cfg, bridge.vision, bridge.llm).eval()
    assert isinstance(carrier.alignment, Alignment) and carrier.aligner is carrier.alignment
    with torch.no_grad():
        carrier.alignment.ln_vision.load_state_dict(bridge.ln_vision.state_dict())
        carrier.alignment.qformer.load_state_dict(bridge.qformer.state_dict())
    torch.testing.assert_close(alignment.classify(carrier, tok, feats, ["circle", "square"]),
                               alignment.classify(bridge, tok, feats, ["circle", "square"]))
    assert not any(p.requires_grad for p in carrier.alignment.parameters())
