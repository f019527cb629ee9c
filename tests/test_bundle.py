"""Bundles: round trip, strict loading, no pickle, referenced components with a content hash."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from qformer.bundle import BundleError, load_bundle, save_bundle, weights_sha256
from qformer.config import BridgeConfig, ComponentRef, QFormerConfig
from qformer.generation import GenerationConfig, generate
from qformer.prompts import PRESETS, TaskPrompts, caption_prompt
from tests.tiny import scene, tiny_bridge


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bridge, tok, proc = tiny_bridge(num_loc_bins=8, num_quality_levels=3)
    path = save_bundle(bridge, tok, proc, tmp_path_factory.mktemp("b") / "bundle")
    return bridge, tok, proc, path


def run(bridge, tok, proc):
    f = bridge.encode_images(proc(images=[scene(0), scene(1)], return_tensors="pt").pixel_values)
    return [g.token_ids for g in generate(bridge, tok, f, ["a photo of", ""], [2, 1], GenerationConfig(max_new_tokens=8))]


def test_round_trip_gives_the_same_generation(saved):
    bridge, tok, proc, path = saved
    loaded = load_bundle(path)
    assert run(loaded.bridge, loaded.tokenizer, loaded.image_processor) == run(bridge, tok, proc)
    assert len(loaded.tokenizer) == len(tok)
    assert loaded.config == bridge.cfg.replace(vision=loaded.config.vision, llm=loaded.config.llm)


def _copy(path, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_load_rejects_mismatched_weights(saved, tmp_path, change):
    path = _copy(saved[3], tmp_path)
    state = load_file(path / "model.safetensors")
    if change == "missing":
        del state["language_projection.bias"]
    elif change == "extra":
        state["surprise.weight"] = torch.zeros(2)
    else:
        state["quality_prompts"] = torch.zeros(4, 3, 48)
    save_file(state, path / "model.safetensors")
    with pytest.raises(BundleError) as err:
        load_bundle(path)
    expected = {"missing": "language_projection.bias", "extra": "surprise.weight", "shape": "quality_prompts"}[change]
    assert expected in str(err.value)


def test_pickle_is_refused_and_never_opened(saved, tmp_path, monkeypatch):
    path = _copy(saved[3], tmp_path)
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    opened = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: opened.append(a))
    with pytest.raises(BundleError, match="pickle"):
        load_bundle(path)
    assert not opened


def test_referenced_component_hash_is_checked(saved, tmp_path):
    path = _copy(saved[3], tmp_path)
    llm_dir = tmp_path / "llm-elsewhere"
    (path / "llm").rename(llm_dir)
    meta = json.loads((path / "qbridge.json").read_text())
    meta["config"]["llm"] = {"source": "reference", "path": str(llm_dir), "sha256": weights_sha256(llm_dir)}
    (path / "qbridge.json").write_text(json.dumps(meta))
    load_bundle(path)  # the hash matches
    meta["config"]["llm"]["sha256"] = "0" * 64
    (path / "qbridge.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(path)


def test_save_with_a_reference(saved, tmp_path):
    bridge, tok, proc, path = saved
    ref = ComponentRef("reference", str(path / "vision"), weights_sha256(path / "vision"))
    out = save_bundle(bridge, tok, proc, tmp_path / "ref", vision_ref=ref)
    assert not (out / "vision").exists()
    assert run(*_parts(load_bundle(out))) == run(bridge, tok, proc)


def _parts(b):
    return b.bridge, b.tokenizer, b.image_processor


def test_cli_caption_and_help(saved, tmp_path):
    bridge, tok, proc, path = saved
    image = tmp_path / "x.png"
    scene(0).save(image)
    out = subprocess.run([sys.executable, "-m", "qformer.cli", "caption", "--model", str(path), str(image),
                          "--max-new-tokens", "8", "--quality", "q2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    f = bridge.encode_images(proc(images=[scene(0)], return_tensors="pt").pixel_values)
    (want,) = generate(bridge, tok, f, [caption_prompt()], [2], GenerationConfig(max_new_tokens=8))
    assert out.stdout.strip() == want.text
    listing = subprocess.run([sys.executable, "-m", "qformer.cli", "--help"], capture_output=True, text=True, timeout=300)
    for name in ("caption", "convert", "export-hf"):
        assert name in listing.stdout
    for bad in (tmp_path / "missing.png", tmp_path / "notes.txt"):  # a clear error, not a traceback
        if bad.suffix == ".txt":
            bad.write_text("not an image")
        out = subprocess.run([sys.executable, "-m", "qformer.cli", "caption", "--model", str(path), str(bad)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and f"cannot read {bad}" in out.stderr and "Traceback" not in out.stderr


def test_prompts_round_trip_through_qbridge_json_and_bad_templates_are_refused():
    cfg = BridgeConfig(prompts=TaskPrompts(caption="describe:", vqa="Q: {question} A:"))
    again = BridgeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.prompts.vqa_prompt(" how  many? ") == "Q: how many? A:"
    assert again.prompts.detect_prompt([" red  circle", "blue square"]) == "detect red circle, blue square:"
    for bad in ({"vqa": "question:"}, {"vqa": "{question} {answer}"}, {"caption": "{question}"},
                {"detect_labels": "detect:"}, {"vqa": "{question"}):
        with pytest.raises(ValueError, match="prompt"):
            TaskPrompts(**bad)


def test_the_stage1_copys_own_qformer_config_round_trips_and_old_bundles_keep_their_query_count():
    """alignment_qformer_config (the stage-1 copy's Q-Former when its shape differs) round-trips through
    qbridge.json; a bundle from before it, which wrote only alignment_query_tokens, loads as that count."""
    qformer = QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            with_text=False, num_query_tokens=12, cross_attention_every=1)
    copy = dataclasses.replace(qformer, with_text=True, num_query_tokens=4, cross_attention_every=2)
    cfg = BridgeConfig(qformer=qformer, alignment_qformer=True, alignment_qformer_config=copy)
    assert BridgeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {**cfg.to_dict(), "alignment_query_tokens": 4}
    del old["alignment_qformer_config"]
    loaded = BridgeConfig.from_dict(old).alignment_qformer_config
    assert loaded == dataclasses.replace(qformer, with_text=True, num_query_tokens=4)


def test_a_bundle_from_before_prompts_loads_and_answers_with_todays_prompts(saved, tmp_path, capsys):
    """qbridge.json written before the task prompts were part of it has no "prompts": it asks what it was trained on."""
    from qformer.cli import caption_main

    bridge, tok, proc, path = saved
    old = _copy(path, tmp_path)
    meta = json.loads((old / "qbridge.json").read_text())
    assert meta["config"]["prompts"] == dataclasses.asdict(PRESETS["qbridge"])  # written since this change
    del meta["config"]["prompts"]
    (old / "qbridge.json").write_text(json.dumps(meta))
    prompts = load_bundle(old).config.prompts
    assert prompts == PRESETS["qbridge"]
    assert (prompts.caption_prompt(), prompts.vqa_prompt("how  many?"), prompts.detect_prompt(["red circle"])) == (
        "caption:", "question: how many? answer:", "detect red circle:")
    image = tmp_path / "x.png"
    scene(0).save(image)
    assert caption_main([str(image), "--model", str(old), "--max-new-tokens", "8"]) == 0
    f = bridge.encode_images(proc(images=[scene(0)], return_tensors="pt").pixel_values)
    (want,) = generate(bridge, tok, f, ["caption:"], [2], GenerationConfig(max_new_tokens=8))
    assert capsys.readouterr().out == want.text + "\n"


def test_a_conv_tower_bundle_round_trips_and_export_hf_refuses_it(tmp_path, capsys):
    from qformer.hf_interop import export_main

    bridge, tok, proc = tiny_bridge("resnet", num_loc_bins=8)
    path = save_bundle(bridge, tok, proc, tmp_path / "bundle")
    loaded = load_bundle(path)
    assert type(loaded.bridge.vision).__name__ == "ResNetModel"
    f = loaded.bridge.encode_images(proc(images=[scene(0)], return_tensors="pt").pixel_values)
    assert f.shape == (1, 16, 32)
    want = [g.token_ids for g in generate(bridge, tok, bridge.encode_images(
        proc(images=[scene(0)], return_tensors="pt").pixel_values), [""], config=GenerationConfig(max_new_tokens=6))]
    assert [g.token_ids for g in generate(loaded.bridge, loaded.tokenizer, f, [""],
                                          config=GenerationConfig(max_new_tokens=6))] == want
    assert export_main([str(path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Blip2VisionModel" in err and "ResNetModel" in err
    assert not (tmp_path / "hf").exists()


def test_quality_levels_are_named_once_in_the_config():
    cfg = tiny_bridge(num_quality_levels=3)[0].cfg.replace(quality_names=("low", "mid"))
    assert [cfg.quality_name(i) for i in range(3)] == ["low", "mid", "2"]  # unnamed levels go by number
    assert cfg.quality_level("mid") == 1 and cfg.quality_level("2") == 2


def test_one_strict_loader_for_trainable_state_with_a_prefix_filter():
    from qformer.bundle import load_trainable

    src, dst = tiny_bridge(seed=1)[0], tiny_bridge(seed=2)[0]
    stage1 = {k: v for k, v in src.trainable_state_dict().items() if k.startswith(("ln_vision", "qformer"))}
    assert stage1 and len(stage1) < len(src.trainable_state_dict())
    load_trainable(dst, stage1, ("ln_vision", "qformer"))
    got = dst.trainable_state_dict()
    assert all(torch.equal(got[k], v) for k, v in stage1.items())
    assert not torch.equal(got["language_projection.weight"], src.trainable_state_dict()["language_projection.weight"])

    dropped = dict(stage1)
    gone = sorted(dropped)[0]
    del dropped[gone]
    with pytest.raises(BundleError, match=re.escape(gone)) as err:
        load_trainable(dst, dropped, ("ln_vision", "qformer"), source="run/stage1.safetensors")
    assert "run/stage1.safetensors" in str(err.value) and "missing" in str(err.value)
    with pytest.raises(BundleError, match="unexpected keys.*language_projection"):
        load_trainable(dst, {**stage1, "language_projection.weight": got["language_projection.weight"]},
                       ("ln_vision", "qformer"))
    with pytest.raises(BundleError, match="missing keys"):  # without the filter, all trainable keys are due
        load_trainable(dst, stage1)


def test_a_bundle_saves_no_padding_or_truncation_its_tokenizer_kept_from_a_call(tmp_path):
    bridge, tok, proc = tiny_bridge()
    clean = save_bundle(bridge, tok, proc, tmp_path / "clean")
    tok(["a red circle", "a"], padding=True, truncation=True, max_length=4)  # a fast tokenizer keeps these
    used = save_bundle(bridge, tok, proc, tmp_path / "used")
    saved = [(d / "tokenizer" / "tokenizer.json").read_bytes() for d in (used, clean)]
    assert saved[0] == saved[1]
    assert load_bundle(used).tokenizer(["a red circle", "a"], padding=True).input_ids == tok(
        ["a red circle", "a"], padding=True).input_ids
