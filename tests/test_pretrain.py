"""Pretraining the demo's frozen text parts: tokenizer and small Llama (tiny runs). The vision tower: test_vision.py."""

import json
from random import Random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qformer.prompts import caption_prompt, detect_prompt, vqa_prompt
from training.demo import pretrain
from training.demo.pretrain import (
    PROMPT_WORDS, TINY_LLM, WORLD_WORDS, dataset_texts, detection_text, llm_config, pretrain_llm, scene_description,
    train_tokenizer, world_documents, world_texts,
)
from training.demo.shapes import HELDOUT_PAIRS, LEVELS, caption, make_scene, reading_order, write_dataset


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
    assert tasks == {"caption", "vqa", "detect"}
    docs = list(world_documents(3, 60))
    assert [t for t, _ in items] == [d.task for d in docs]
    assert [j for _, j in items] == [f"{d.context} {d.text}" if d.context else d.text for d in docs]
    texts = [d.text for d in docs]
    assert any(t.startswith(caption_prompt() + " there are") for t in texts)
    assert any(t.startswith(vqa_prompt("how many shapes are there?")) for t in texts)
    assert any(t.startswith(detect_prompt() + " ") and "; " in t for t in texts)
    # one prompt, one format: every detection text carries boxes (labels alone would make "detect:" ambiguous)
    assert all(t.split(";")[0].split()[-4:][0].isdigit() for t in texts if t.startswith("detect"))
    assert not any("<loc_" in t for t in texts)
    for colour, shape in HELDOUT_PAIRS:
        assert not any(f"{colour} {shape}" in t for t in texts)


def test_dataset_texts_match_generated_texts(tmp_path):
    write_dataset(tmp_path, 6, seed=2, progress=False)  # 224 px, as world_texts' scenes
    from_files = set(dataset_texts(tmp_path))
    generated = {d.text for d in world_documents(2, 6)}
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
        row, col = scene.cell(o)
        box = " ".join(map(str, codec.encode_box(o.box, 224, 224)))
        assert f"{row} {col} {o.size} {o.colour} {o.shape} {box}." in ctx
    boxes = detection_text(scene, 64)
    groups = [g.rsplit(" ", 4) for g in boxes.removeprefix(detect_prompt() + " ").split("; ")]
    # the same objects, in the same (reading) order as the description: the LLM copies them position by position
    assert [(label, tuple(map(int, xyxy))) for label, *xyxy in groups] == [
        (o.label, codec.encode_box(o.box, 224, 224)) for o in reading_order(scene)]
    assert [g[0] for g in groups] == [" ".join(part.split()[3:5]) for part in ctx.split(". ")[1:]]
    wanted = [scene.objects[0].label]
    filtered = detection_text(scene, 64, wanted)
    assert filtered.startswith(detect_prompt(wanted) + " ")
    assert all(g.rsplit(" ", 4)[0] == wanted[0] for g in filtered.removeprefix(detect_prompt(wanted) + " ").split("; "))
    docs = list(world_documents(5, 40, noise=0.5))
    with_ctx = [d for d in docs if d.context]
    assert 0.5 < len(with_ctx) / len(docs) < 0.99
    assert all(d.context == scene_description(make_scene(5, "train", 0)) for d in docs[:8] if d.context)
    # a caption read with a context is that scene's clean caption (noise comes without a context)
    by_ctx = {scene_description(make_scene(5, "train", i)): make_scene(5, "train", i) for i in range(40)}
    for d in docs:
        if d.task == "caption" and d.context:
            assert d.prompt == caption_prompt() and d.target in {caption(by_ctx[d.context], lv) for lv in LEVELS}


def test_only_the_target_is_predicted(tok):
    docs = [d for d in world_documents(4, 3) if d.context][:12]
    rows = pretrain._encode_documents(tok, docs, 128)
    ids, _, labels = pretrain._pad([r for r, _ in rows], tok.pad_token_id, [n for _, n in rows])
    for i, d in enumerate(docs):
        joined = tok(d.context, add_special_tokens=False)["input_ids"] + tok(d.text)["input_ids"]
        assert ids[i, : len(joined)].tolist() == joined  # the same ids as the joined text
        predicted = [t for t in labels[i].tolist() if t != -100]
        assert tok.decode(predicted) == f" {d.target}</s>"


def test_a_packed_scene_computes_each_document_as_if_read_alone(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llm_config(tok, **{k: v for k, v in TINY_LLM.items()})).eval()
    groups = list(pretrain.world_scenes(6, 3, noise=1.0))  # noise: some captions come without the context
    assert any(not d.context for g in groups for d in g)
    rows = [pretrain._pack(tok, g, 128) for g in groups]
    batch = pretrain._collate(rows, tok.pad_token_id)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k not in ("labels", "weights")}).logits
        for i, (group, row) in enumerate(zip(groups, rows)):
            segments = torch.tensor(row.segments)
            for k, d in enumerate(group, start=1):
                (ids, _), = pretrain._encode_documents(tok, [d], 128)
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                mine = (segments == k) | (segments == -k)
                n = int(mine.sum())
                assert torch.tensor(row.ids)[mine].tolist() == ids[-n:]
                torch.testing.assert_close(packed[i, : len(row.ids)][mine], alone[-n:], atol=1e-4, rtol=1e-4)
    # every token after <s> is predicted; the description, <s> and padding are not
    labels = batch["labels"][0, : len(rows[0].ids)]
    first = [abs(x) for x in rows[0].segments].index(1)
    assert (labels[:first] == -100).all() and labels[first] == -100 and labels[first + 1] != -100


def test_weighted_loss_is_the_models_own_at_weight_one_and_weighs_vqa_answers_only(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llm_config(tok, **TINY_LLM)).eval()
    groups = list(pretrain.world_scenes(3, 2))
    plain = pretrain._collate([pretrain._pack(tok, g, 128) for g in groups], tok.pad_token_id)
    with torch.no_grad():
        own = model(**{k: v for k, v in plain.items() if k != "weights"}).loss
        torch.testing.assert_close(pretrain.weighted_lm_loss(model, plain), own)
    row = pretrain._pack(tok, groups[0], 128, answer_weight=3.0)
    heavy = [t for t, w in zip(row.labels, row.weights) if w == 3.0]
    answers = "".join(f" {d.target}</s>" for d in groups[0] if d.task == "vqa")
    assert tok.decode(heavy) == answers
    assert all(w == 0.0 for t, w in zip(row.labels, row.weights) if t == -100)
    assert set(row.weights) == {0.0, 1.0, 3.0}


def test_llm_pretraining_continues_from_a_saved_llm(tok, tmp_path):
    kw = dict(steps=24, batch_size=16, lr=3e-3, eval_scenes=0, progress=False, **TINY_LLM)
    first = pretrain_llm(None, tok, tmp_path / "a", **kw)
    more = pretrain_llm(None, tok, None, **dict(kw, steps=2, lr=1e-6), init_from=tmp_path / "a")
    # it starts where the saved one ended, not from scratch
    assert more["first_loss"] < first["first_loss"] - 0.5
    assert abs(more["first_loss"] - first["final_loss"]) < 0.3
    assert more["parameters"] == first["parameters"]


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


def test_tasks_keeps_only_those_documents_and_the_cli_passes_them(tok, tmp_path, capsys):
    stream = pretrain._text_stream(None, 0, 0.1, Random(0), n_questions=5, tasks=("vqa",))
    groups = [next(stream) for _ in range(6)]
    assert all(d.task == "vqa" and d.context for g in groups for d in g)
    assert sum(map(len, groups)) > 6  # the scenes' questions, not one document a scene
    out = tmp_path / "llm"
    assert pretrain.main(["llm", "--out", str(out), "--tiny", "--steps", "2", "--quiet", "--tasks", "vqa",
                          "--questions", "3"]) == 0
    saved = json.loads((out / "pretrain.json").read_text())
    assert (saved["tasks"], saved["n_questions"]) == (["vqa"], 3)


def test_cli_tokenizer(tmp_path, capsys):
    assert pretrain.main(["tokenizer", "--out", str(tmp_path), "--scenes", "50"]) == 0
    assert "vocabulary" in capsys.readouterr().out
    assert AutoTokenizer.from_pretrained(str(tmp_path))("caption:").input_ids[0] == 1
