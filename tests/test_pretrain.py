"""Pretraining the demo's frozen parts: tokenizer, small Llama, small BLIP-2 vision encoder (tiny runs)."""

import json
from random import Random

import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, Blip2VisionModel

from qformer.prompts import caption_prompt, detect_prompt, vqa_prompt
from training import pretrain
from training.pretrain import (
    PROMPT_WORDS, TINY_LLM, TINY_VISION, WORLD_WORDS, dataset_texts, detection_text, llm_config, object_phrase, patch_weights,
    pretrain_llm, pretrain_vision, scene_description, train_tokenizer, twin_scene, world_documents, world_texts,
)
from training.shapes import (
    HELDOUT_PAIRS, LEVELS, SEEN_PAIRS, Obj, Scene, caption, make_scene, parse_caption, render, write_dataset,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(None, out, n_scenes=300)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return AutoTokenizer.from_pretrained(str(tok_dir))


# ----------------------------------------------------------------------------- tokenizer


def test_world_words_are_single_tokens(tok):
    for word in WORLD_WORDS + PROMPT_WORDS:
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1, word
    for prompt in ("caption:", "question:", "detect:"):  # as a text starts
        assert len(tok(prompt, add_special_tokens=False).input_ids) == 1, prompt
    assert len(tok) <= 640


def test_round_trip_bos_and_padding(tok):
    texts = ["question: how many crosses are there? answer: 10",
             "caption: there are two shapes on a checkered background. a small red circle is in the top left.",
             "détect: ünïcode & odd   spacing; <loc_3>"]
    for text in texts:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids, skip_special_tokens=True) == text
    batch = tok(["caption:", "question: what colour is the star? answer:"], padding=True)
    assert tok.padding_side == "left" and batch.input_ids[0][0] == tok.pad_token_id
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")


def test_world_texts_formats_determinism_and_no_heldout_pairs():
    items = list(world_texts(3, 60, with_task=True))
    assert items == list(world_texts(3, 60, with_task=True))
    tasks = {t for t, _ in items}
    assert tasks == {"caption", "vqa", "detect", "boxes"}
    docs = list(world_documents(3, 60))
    assert [t for t, _ in items] == [d[0] for d in docs]
    assert [j for _, j in items] == [f"{c} {t}" if c else t for _, c, t in docs]
    texts = [t for _, _, t in docs]
    assert any(t.startswith(caption_prompt() + " there are") for t in texts)
    assert any(t.startswith(vqa_prompt("how many shapes are there?")) for t in texts)
    assert any(t.startswith(detect_prompt() + " ") and "; " in t for t in texts)
    assert not any("<loc_" in t for t in texts)
    for colour, shape in HELDOUT_PAIRS:
        assert not any(f"{colour} {shape}" in t for t in texts)


def test_dataset_texts_match_generated_texts(tmp_path):
    write_dataset(tmp_path, 6, seed=2, progress=False)  # 224 px, as world_texts' scenes
    from_files = set(dataset_texts(tmp_path))
    generated = {text for _, _, text in world_documents(2, 6)}
    detects = {t for t in from_files if t.startswith("detect: ")}
    assert len(detects) == 6 and detects <= generated
    assert any(t.startswith("question: ") for t in from_files) and any(t.startswith("caption: ") for t in from_files)


def test_documents_put_the_scene_with_its_boxes_before_the_text():
    from qformer.boxes import BoxCodec

    codec = BoxCodec(64)
    scene = make_scene(5, "train", 2)
    ctx = scene_description(scene, 64)
    assert ctx.startswith(f"{scene.background} background.")
    for o in scene.objects:
        assert f"{o.size} {o.colour} {o.shape} {' '.join(map(str, codec.encode_box(o.box, 224, 224)))}." in ctx
    boxes = detection_text(scene, Random(0), 64)
    groups = [g.rsplit(" ", 4) for g in boxes.removeprefix(detect_prompt() + " ").split("; ")]
    assert sorted((label, tuple(map(int, xyxy))) for label, *xyxy in groups) == sorted(
        (o.label, codec.encode_box(o.box, 224, 224)) for o in scene.objects)
    docs = list(world_documents(5, 40, noise=0.5))
    with_ctx = [d for d in docs if d[1]]
    assert 0.5 < len(with_ctx) / len(docs) < 0.95
    assert all(ctx == scene_description(make_scene(5, "train", 0)) for _, ctx, _ in docs[:8] if ctx)
    # a caption read with a context is that scene's clean caption (noise comes without a context)
    by_ctx = {scene_description(make_scene(5, "train", i)): make_scene(5, "train", i) for i in range(40)}
    for task, ctx, text in docs:
        if task == "caption" and ctx:
            assert text.removeprefix(caption_prompt() + " ") in {caption(by_ctx[ctx], lv) for lv in LEVELS}


# ----------------------------------------------------------------------------- LLM


def test_default_llm_config_has_head_dim_64(tok):
    cfg = llm_config(tok)
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads == 64
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (256, 4, len(tok))
    assert not cfg.tie_word_embeddings


def test_tiny_llm_learns_and_saves(tok, tmp_path):
    out = tmp_path / "llm"
    m = pretrain_llm(None, tok, out, steps=24, batch_size=16, lr=3e-3, eval_scenes=8, progress=False, **TINY_LLM)
    assert m["final_loss"] < m["first_loss"] - 0.5
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    reloaded = AutoTokenizer.from_pretrained(str(out))
    enc = reloaded(["caption: a red circle"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, m["model"].eval()(**enc).logits)
    assert json.loads((out / "pretrain.json").read_text())["metrics"]["steps"] == 24


def test_llm_is_deterministic_by_seed_and_reads_text_lists(tok):
    kw = dict(steps=3, batch_size=8, eval_scenes=0, progress=False, **TINY_LLM)
    a, b = pretrain_llm(None, tok, **kw)["model"], pretrain_llm(None, tok, **kw)["model"]
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    m = pretrain_llm(["caption: a red circle", "detect: red circle"], tok, **kw)
    assert m["steps"] == 3


# ----------------------------------------------------------------------------- vision


def test_twin_scenes_change_the_caption_and_stay_valid():
    kinds = set()
    for index in range(60):
        scene = make_scene(0, "train", index)
        twin = twin_scene(scene, Random(index))
        assert twin is not None
        edited, kind = twin
        kinds.add(kind)
        assert caption(edited, "detailed") != caption(scene, "detailed")
        for o in edited.objects:
            assert (o.colour, o.shape) in SEEN_PAIRS
            assert 0 <= o.box[0] < o.box[2] <= edited.width and 0 <= o.box[1] < o.box[3] <= edited.height
    assert kinds == set(pretrain.EDITS)


def test_tiny_vision_learns_and_saves(tok_dir, tmp_path):
    out = tmp_path / "vision"
    m = pretrain_vision(out, 24, tokenizer=tok_dir, batch_size=16, lr=2e-3, eval_batches=1, render_size=96,
                        progress=False, **TINY_VISION)
    assert m["final_loss"] < m["first_loss"] - 0.2
    assert set(m["final_losses"]) == {"contrastive_loss", "region_loss"}
    assert set(m["val"]) >= {"retrieval_i2t", "retrieval_t2i", "region_r2p", "twin_accuracy"}
    model = Blip2VisionModel.from_pretrained(str(out), use_safetensors=True)
    processor = AutoImageProcessor.from_pretrained(str(out))
    pixels = processor(images=[render(make_scene(0, "val", 0))], return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 64, 64)
    with torch.no_grad():
        h = model(pixel_values=pixels).last_hidden_state
        assert h.shape == (1, 1 + (64 // 16) ** 2, 64)
        assert torch.equal(h, m["model"].eval()(pixel_values=pixels).last_hidden_state)


def test_patch_weights_cover_the_box_and_phrases_follow_the_grammar():
    scene = Scene(1, 160, 160, "grey", (Obj("circle", "red", "small", (0, 0, 16, 16)),
                                        Obj("star", "blue", "large", (88, 72, 120, 96))))
    w = patch_weights(scene, scene.objects[0], 10).view(10, 10)
    assert w[0, 0] == 1 and w.sum() == 1
    w = patch_weights(scene, scene.objects[1], 10).view(10, 10)  # rows 4.5..6, columns 5.5..7.5
    assert torch.allclose(w.sum(), torch.tensor(1.0))
    assert {tuple(rc) for rc in torch.nonzero(w).tolist()} == {(r, c) for r in (4, 5) for c in (5, 6, 7)}
    assert torch.isclose(w[5, 6], 2 * w[4, 6]) and torch.isclose(w[5, 6], 2 * w[5, 5])
    phrase = object_phrase(scene, scene.objects[1])
    assert phrase == "a large blue star is in the center"
    assert parse_caption(phrase)[0].fits(scene, scene.objects[1])


def test_cli_tokenizer(tmp_path, capsys):
    assert pretrain.main(["tokenizer", "--out", str(tmp_path), "--scenes", "50"]) == 0
    assert "vocabulary" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(tmp_path))("caption:").input_ids[0] == 1


def test_levels_are_checked(tmp_path):
    with pytest.raises(ValueError):
        pretrain_vision(tmp_path, 1, levels=("verbose",), progress=False)
    assert set(LEVELS) >= {"normal", "detailed"}
