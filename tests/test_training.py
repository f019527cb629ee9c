"""Smoke runs of both stages on tiny components: losses fall, resume is exact, checkpoints are atomic."""

import json
from pathlib import Path

import pytest
import torch

from tests.tiny import tiny_image_processor, tiny_llm, tiny_tokenizer, tiny_vision
from training.config import CONFIG_DIR, load_config
from training.demo.shapes import write_dataset
from training.train import train


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    write_dataset(root / "data", n=24, seed=0, noise=0.3, n_val=2, n_test=2, n_heldout=2, size=(64, 64),
                  progress=False)
    vision, proc = tiny_vision("blip2")
    vision.save_pretrained(root / "vision")
    proc.save_pretrained(root / "vision")
    tok = tiny_tokenizer()
    tiny_llm("llama", tok).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root


def overrides(world, out, **more):
    base = {"model.vision": str(world / "vision"), "model.llm": str(world / "llm"), "data.root": str(world / "data"),
            "run.out_dir": str(out)}
    base.update(more)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_stage1_loss_falls_and_resume_is_exact(world, tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "full"))
    train(cfg, progress=False)
    full = losses(tmp_path / "full")
    first, last = full[0], full[-1]
    total = lambda r: r["itc_loss"] + r["itm_loss"] + r["itg_loss"]  # noqa: E731
    assert total(last) < total(first)
    assert (tmp_path / "full" / "final" / "stage1.safetensors").is_file()

    cfg2 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "resumed"))
    train(cfg2, stop_after=10, progress=False)  # "killed" after the step-10 checkpoint
    train(cfg2, progress=False)
    resumed = losses(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        for k in ("itc_loss", "itm_loss", "itg_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)


def test_stage1_continues_from_an_earlier_run(world, tmp_path):
    from safetensors.torch import load_file

    first = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 4}))
    train(first, progress=False)
    done = load_file(tmp_path / "s1" / "final" / "stage1.safetensors")
    # At lr 0 a continued run must end where the earlier one ended; a fresh run (the control) does not.
    for name, init in (("cont", str(tmp_path / "s1")), ("fresh", "")):
        cfg = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(
            world, tmp_path / name, **{"model.init_from": init, "run.steps": 2, "optim.lr": 0.0, "run.seed": 1}))
        train(cfg, progress=False)
        got = load_file(tmp_path / name / "final" / "stage1.safetensors")
        same = got.keys() == done.keys() and all(torch.equal(got[k], done[k]) for k in done)
        assert same == (name == "cont"), name


def test_quality_bins_are_equal_width_by_default_as_noc_or_equal_count():
    from training.quality import bin_levels, score_and_bin

    scores = [0.0, 0.1, 0.2, 0.9, 1.0, float("nan")]
    levels, edges = bin_levels(scores, 2)  # NoC: halfway between the lowest and the highest score
    assert edges == pytest.approx([0.5]) and levels == [0, 0, 0, 1, 1, 0]
    levels, edges = bin_levels(scores, 2, "quantile")  # the median of the scored pairs
    assert edges == pytest.approx([0.2]) and levels == [0, 0, 1, 1, 1, 0]
    levels, edges = bin_levels(scores, 4)
    assert edges == pytest.approx([0.25, 0.5, 0.75]) and levels == [0, 0, 0, 3, 3, 0]
    with pytest.raises(ValueError, match="unknown binning 'bogus'.*uniform, quantile"):
        bin_levels(scores, 2, "bogus")
    with pytest.raises(ValueError, match="unknown binning"):  # before any model is loaded or pair scored
        score_and_bin(None, "no-such-run", 4, binning="bogus")


def test_quality_then_stage2_writes_a_bundle(world, tmp_path):
    from training.quality import score_and_bin

    s1 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 10}))
    train(s1, progress=False)
    out = score_and_bin(s1, str(tmp_path / "s1"), levels=2, out=str(tmp_path / "q.json"))
    data = json.loads(out.read_text())
    assert {a["quality"] for a in data["annotations"]} == {0, 1}
    import shutil

    shutil.copy(out, world / "data" / "captions_train_quality.json")
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json",
                      overrides(world, tmp_path / "s2", **{"model.init_from": str(tmp_path / "s1"), "run.steps": 40}))
    train(cfg, progress=False)
    log = losses(tmp_path / "s2")
    for task in ("caption", "vqa", "detect"):
        series = [r[f"{task}_lm_loss"] for r in log if f"{task}_lm_loss" in r]
        assert series, task
    from qformer.bundle import load_bundle

    bundle = load_bundle(tmp_path / "s2" / "bundle")
    assert bundle.config.num_loc_bins == 16 and bundle.qformer_tokenizer is not None
    # Frozen parts did not move; the text FFN of the Q-Former stayed as stage 1 left it.
    from safetensors.torch import load_file

    s1_state = load_file(tmp_path / "s1" / "final" / "stage1.safetensors")
    k = "qformer.encoder.layer.0.intermediate.dense.weight"
    assert torch.equal(bundle.bridge.trainable_state_dict()[k], s1_state[k])
    k = "qformer.encoder.layer.0.intermediate_query.dense.weight"
    assert not torch.equal(bundle.bridge.trainable_state_dict()[k], s1_state[k])


def test_quality_scores_read_stage1s_feature_cache(world, tmp_path, monkeypatch):
    """With run.feature_cache set, scoring reads the cache stage 1 wrote (one encoding per image, not one per
    caption) and gives the scores of encoding each caption's image on the fly, to fp16's precision."""
    from training.quality import score_and_bin

    cache = tmp_path / "cache"
    s1 = load_config(CONFIG_DIR / "tiny_stage1.json",
                     overrides(world, tmp_path / "s1", **{"run.steps": 4, "run.feature_cache": str(cache)}))
    train(s1, progress=False)
    from qformer.bridge import Bridge

    def no_encoding(self, pixels):
        raise AssertionError("scoring encoded an image that stage 1's cache holds")

    with monkeypatch.context() as m:
        m.setattr(Bridge, "encode_images", no_encoding)
        cached = json.loads(score_and_bin(s1, str(tmp_path / "s1"), 2, str(tmp_path / "c.json")).read_text())
    plain = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 4}))
    fresh = json.loads(score_and_bin(plain, str(tmp_path / "s1"), 2, str(tmp_path / "f.json")).read_text())
    got = [a["alignment"] for a in cached["annotations"]]
    want = [a["alignment"] for a in fresh["annotations"]]
    assert len(got) == len(want) > 0
    assert got == pytest.approx(want, abs=2e-3)


def test_stage2_continues_from_an_earlier_stage2_run(world, tmp_path):
    """model.init_from naming a stage-2 run continues all its trainable weights (the stage-1 copy for ITC/ITM
    included); at lr 0 the continued bundle equals the earlier one, and one started from stage 1 does not."""
    from safetensors.torch import load_file

    s1 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 4}))
    train(s1, progress=False)
    common = {"model.keep_alignment": "true", "model.num_quality_levels": 0, "data.captions": "captions_{split}.json"}
    first = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(
        world, tmp_path / "a", **{**common, "model.init_from": str(tmp_path / "s1"), "run.steps": 4}))
    train(first, progress=False)
    done = load_file(tmp_path / "a" / "bundle" / "model.safetensors")
    for name, init in (("cont", tmp_path / "a"), ("from-stage1", tmp_path / "s1")):
        cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / name, **{
            **common, "model.init_from": str(init), "run.steps": 2, "optim.lr": 0.0, "run.seed": 1}))
        train(cfg, progress=False)
        got = load_file(tmp_path / name / "bundle" / "model.safetensors")
        same = got.keys() == done.keys() and all(torch.equal(got[k], done[k]) for k in done)
        assert same == (name == "cont"), name


def test_init_from_refuses_a_directory_that_is_no_run(world, tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(
        world, tmp_path / "x", **{"model.init_from": str(tmp_path), "run.steps": 2}))
    with pytest.raises(FileNotFoundError, match="is not a stage-1 run"):
        train(cfg, progress=False)


def test_stage2_keeps_the_stage1_qformer_for_alignment_when_asked(world, tmp_path):
    """keep_alignment: stage 2 trains a Q-Former without a text branch; the bundle carries stage 1's, frozen,
    and ITC runs through it, so the bundle retrieves as stage 1 did."""
    from safetensors.torch import load_file

    from qformer.bundle import load_bundle
    from qformer.qformer import AttentionMode
    from training.parts import build_parts

    s1 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 10}))
    train(s1, progress=False)
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "model.init_from": str(tmp_path / "s1"), "model.keep_alignment": "true", "run.steps": 6,
        "model.num_quality_levels": 0, "data.captions": "captions_{split}.json"}))
    train(cfg, progress=False)
    bridge = load_bundle(tmp_path / "s2" / "bundle").bridge
    assert bridge.cfg.alignment_qformer and not bridge.cfg.qformer.with_text
    assert not any(k.startswith("qformer.embeddings") for k in bridge.trainable_state_dict())
    s1_state = load_file(tmp_path / "s1" / "final" / "stage1.safetensors")
    state = bridge.trainable_state_dict()
    assert {k[len("alignment."):] for k in state if k.startswith("alignment.")} == set(s1_state)
    k = "qformer.encoder.layer.0.intermediate_query.dense.weight"
    torch.testing.assert_close(state[f"alignment.{k}"], s1_state[k], atol=1e-3, rtol=1e-3)  # stored in fp16
    assert not torch.equal(state[k], s1_state[k])  # the LLM's Q-Former trained on

    stage1 = build_parts(s1, with_llm=False).bridge.eval()
    stage1.load_state_dict(s1_state, strict=False)
    feats = torch.randn(3, 16, bridge.cfg.vision_hidden_size)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for b in (stage1, bridge):
            b.eval()
        want = stage1.qformer.image_features(stage1.query_output(feats))
        got = bridge.aligner.qformer.image_features(bridge.aligner.query_output(feats))
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        text = lambda b: b.qformer.text_features(b.qformer(AttentionMode.TEXT, input_ids=ids).text_output)  # noqa: E731
        torch.testing.assert_close(text(bridge.aligner), text(stage1), atol=2e-2, rtol=2e-2)
        drifted = bridge.qformer(AttentionMode.QUERIES, image_embeds=bridge.ln_vision(feats)).query_output
        assert not torch.allclose(drifted, bridge.aligner.query_output(feats), atol=1e-3)


def test_stage2_trains_on_the_prompts_its_bridge_config_carries(world, tmp_path):
    from qformer.prompts import PRESETS
    from training.parts import build_parts
    from training.train import _examples

    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path, **{
        "model.prompts": "blip2-opt", "data.captions": "captions_{split}.json"}))
    prompts = build_parts(cfg, with_llm=True).bridge.cfg.prompts  # what the bundle's qbridge.json will hold
    assert prompts == PRESETS["blip2-opt"]
    tasks = _examples(cfg, True, prompts)
    assert {e.prompt for e in tasks["caption"]} == {""}
    assert all(e.prompt.startswith("Question: ") and e.prompt.endswith(" Answer:") for e in tasks["vqa"])
    assert {e.prompt for e in tasks["detect"]} == {prompts.detect_prompt()}


def test_interrupted_checkpoint_leaves_the_previous_one(world, tmp_path, monkeypatch):
    from training import checkpoint

    cfg = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "run", **{"run.steps": 20}))
    real = checkpoint.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's first file: die half-way
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt("killed mid-write")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    latest = checkpoint.latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-0000010"
    state, meta = checkpoint.load_checkpoint(latest)
    assert meta["step"] == 10 and state
    monkeypatch.setattr(checkpoint, "save_file", real)
    train(cfg, progress=False)  # resumes from step 10 and finishes
    assert checkpoint.latest_checkpoint(tmp_path / "run").name == "step-0000020"


def test_two_processes_with_accelerate_launch(world, tmp_path):
    import subprocess
    import sys

    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "-m", "training.train", "stage1", "--config",
           str(CONFIG_DIR / "tiny_stage1.json"), *overrides(world, tmp_path / "ddp", **{"run.steps": 6, "run.log_every": 3}),
           "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = losses(tmp_path / "ddp")
    assert {r["world_size"] for r in log} == {2}
    # ITC negatives come from both processes: the loss starts near log(2 * batch), not log(batch)
    import math

    assert abs(log[0]["itc_loss"] - math.log(16)) < abs(log[0]["itc_loss"] - math.log(8))
    assert (tmp_path / "ddp" / "final" / "stage1.safetensors").is_file()


class _NumberTokenizer:
    """Maps " i" to one id per number (or two ids for numbers in `split`)."""

    def __init__(self, first_id: int, split=()):
        self.first_id, self.split = first_id, set(split)

    def __call__(self, text, add_special_tokens=True):
        from types import SimpleNamespace

        i = int(text)
        ids = [self.first_id + i] if i not in self.split else [self.first_id, self.first_id + 1]
        return SimpleNamespace(input_ids=ids)


def test_location_rows_start_at_the_llms_number_rows():
    from tests.tiny import tiny_bridge
    from training.parts import init_location_rows_from_numbers

    bridge, _, _ = tiny_bridge(num_loc_bins=4)
    before = bridge.loc_embeddings.detach().clone()
    assert not init_location_rows_from_numbers(bridge, _NumberTokenizer(3, split={2}))
    assert torch.equal(bridge.loc_embeddings, before)  # a multi-token number: rows untouched
    assert init_location_rows_from_numbers(bridge, _NumberTokenizer(3))
    emb = bridge.llm.get_input_embeddings().base.weight
    head = bridge.llm.get_output_embeddings().base.weight
    assert torch.equal(bridge.loc_embeddings, emb[3:7].float())
    assert torch.equal(bridge.loc_head, head[3:7].float())
    ids = torch.tensor([[bridge.cfg.base_vocab_size + 1, 4]])  # <loc_1> embeds exactly as the number " 1"
    out = bridge.llm.get_input_embeddings()(ids)
    assert torch.equal(out[0, 0], out[0, 1])


def test_grad_accum_logs_the_mean_of_its_micro_batches(world, tmp_path):
    # With lr 0 the weights stay put, and micro-batch m of step s is the batch a run without accumulation
    # draws at step s * grad_accum + m: one step of two micro-batches logs the mean of two plain steps.
    plain = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(
        world, tmp_path / "plain", **{"optim.lr": 0.0, "run.steps": 2, "run.log_every": 1, "run.grad_accum": 1}))
    accum = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(
        world, tmp_path / "accum", **{"optim.lr": 0.0, "run.steps": 1, "run.log_every": 1, "run.grad_accum": 2}))
    train(plain, progress=False)
    train(accum, progress=False)
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "accum")
    for k in ("itc_loss", "itm_loss", "itg_loss"):
        assert b[0][k] == pytest.approx((a[0][k] + a[1][k]) / 2, rel=1e-5), k


def test_training_on_webdataset_shards_logs_what_the_json_files_give(world, tmp_path):
    """The same examples in the same order from shards as from the JSON files: the same losses."""
    runs = {}
    for name, extra in (("json", {}), ("shards", {"data.shards": "shards/{split}-*.tar"})):
        cfg = load_config(CONFIG_DIR / "tiny_stage1.json",
                          overrides(world, tmp_path / name, **{"run.steps": 3, "run.log_every": 1, **extra}))
        train(cfg, progress=False)
        runs[name] = losses(tmp_path / name)
    assert len(runs["shards"]) == 3
    for a, b in zip(runs["json"], runs["shards"]):
        assert a["itc_loss"] == pytest.approx(b["itc_loss"], rel=1e-5)


def _write_contexts(world, name: str, text_of) -> str:
    images = json.loads((world / "data" / "captions_train.json").read_text())["images"]
    (world / "data" / name).write_text(json.dumps({"contexts": [{"image_id": im["id"], "text": text_of(im["id"])}
                                                                for im in images]}))
    return name


def test_stage2_context_distillation_teaches_the_queries_to_write_the_context(world, tmp_path):
    """run.context_weight: query slot s learns the LLM's input embedding of context token s; the loss falls,
    and the nearest embedding row of the written slots is the context's token."""
    name = _write_contexts(world, "contexts_ok.json", lambda i: "red circle")
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "run.steps": 60, "run.context_weight": 1.0, "data.contexts": name, "model.num_quality_levels": 0,
        "data.captions": "captions_{split}.json", "optim.lr": 3e-3}))
    train(cfg, progress=False)
    log = [r for r in losses(tmp_path / "s2") if any(k.endswith("context_loss") for k in r)]
    ctx = lambda r: next(v for k, v in r.items() if k.endswith("context_loss"))  # noqa: E731
    acc = lambda r: next(v for k, v in r.items() if k.endswith("context_acc"))  # noqa: E731
    assert ctx(log[-1]) < 0.8 * ctx(log[0])  # without the loss's gradient it would not move
    assert acc(log[-1]) > 0.9


def test_stage2_context_only_steps_train_the_context_loss_alone_first(world, tmp_path):
    """run.context_only_steps: those first steps log the context loss and no LM loss (the LLM is not run);
    the LM loss joins after them. Without the context loss there is nothing for them to train."""
    name = _write_contexts(world, "contexts_first.json", lambda i: "red circle")
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "run.steps": 5, "run.log_every": 1, "run.context_weight": 1.0, "run.context_only_steps": 3,
        "data.contexts": name, "model.num_quality_levels": 0, "data.captions": "captions_{split}.json"}))
    train(cfg, progress=False)
    log = losses(tmp_path / "s2")
    assert len(log) == 5
    for r in log[:3]:
        assert any(k.endswith("_context_loss") for k in r) and not any(k.endswith("_lm_loss") for k in r), r
    for r in log[3:]:
        assert any(k.endswith("_context_loss") for k in r) and any(k.endswith("_lm_loss") for k in r), r
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s3", **{
        "run.steps": 2, "run.context_only_steps": 1}))
    with pytest.raises(ValueError, match="context_only_steps needs"):
        train(cfg, progress=False)


def test_stage2_refuses_a_context_longer_than_its_queries(world, tmp_path):
    name = _write_contexts(world, "contexts_long.json", lambda i: " ".join(["red circle"] * 40))
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "run.steps": 2, "run.context_weight": 1.0, "data.contexts": name}))
    with pytest.raises(ValueError, match="queries"):
        train(cfg, progress=False)
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s3", **{
        "run.steps": 2, "run.context_weight": 1.0}))
    with pytest.raises(ValueError, match="data.contexts"):
        train(cfg, progress=False)
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s4", **{
        "run.steps": 2, "run.context_weight": 1.0, "data.contexts": "contexts_{split}_missing.json"}))
    with pytest.raises(FileNotFoundError, match="contexts"):
        train(cfg, progress=False)


def test_stage2_may_use_more_queries_than_its_stage1_copy(world, tmp_path):
    """keep_alignment with more stage-2 queries: the copy keeps stage 1's count (and its exact queries), the
    new Q-Former starts from stage 1's queries repeated; the bundle loads back with both counts."""
    from safetensors.torch import load_file

    from qformer.bundle import load_bundle

    s1 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 4}))
    train(s1, progress=False)
    n1 = s1.model.qformer["num_query_tokens"]
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "model.init_from": str(tmp_path / "s1"), "model.keep_alignment": "true", "run.steps": 2,
        "model.qformer.num_query_tokens": 2 * n1 + 1, "model.num_quality_levels": 0,
        "data.captions": "captions_{split}.json"}))
    train(cfg, progress=False)
    bridge = load_bundle(tmp_path / "s2" / "bundle").bridge
    assert bridge.cfg.qformer.num_query_tokens == 2 * n1 + 1
    assert bridge.cfg.alignment_qformer_config.num_query_tokens == n1
    s1_queries = load_file(tmp_path / "s1" / "final" / "stage1.safetensors")["qformer.query_tokens"]
    torch.testing.assert_close(bridge.alignment.qformer.query_tokens.float(), s1_queries, atol=1e-3, rtol=1e-3)
    assert bridge.aligner.query_output(torch.randn(1, 16, bridge.cfg.vision_hidden_size)).shape[1] == n1


def test_stage2_qformer_of_its_own_shape_from_scratch(world, tmp_path):
    """model.init_qformer=false: the stage-1 copy is stage 1's, exactly; stage 2's own Q-Former (here with
    cross-attention in every layer and one more layer, which no stage-1 weights fit) starts from scratch; the
    bundle loads back with both shapes, and a run continued from it keeps the copy's shape."""
    from safetensors.torch import load_file

    from qformer.bundle import load_bundle

    s1 = load_config(CONFIG_DIR / "tiny_stage1.json", overrides(world, tmp_path / "s1", **{"run.steps": 4}))
    train(s1, progress=False)
    layers = s1.model.qformer["num_hidden_layers"]
    shape = {"model.qformer.cross_attention_every": 1, "model.qformer.num_hidden_layers": layers + 1,
             "model.keep_alignment": "true", "model.num_quality_levels": 0, "data.captions": "captions_{split}.json",
             "run.steps": 2}
    strict = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "strict", **{
        **shape, "model.init_from": str(tmp_path / "s1")}))
    with pytest.raises(Exception, match="stage-1 run of this architecture"):
        train(strict, progress=False)  # stage 1's query path does not fit the new shape
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        **shape, "model.init_from": str(tmp_path / "s1"), "model.init_qformer": "false"}))
    train(cfg, progress=False)
    bridge = load_bundle(tmp_path / "s2" / "bundle").bridge
    assert bridge.cfg.qformer.num_hidden_layers == layers + 1 and bridge.cfg.qformer.cross_attention_every == 1
    copy = bridge.cfg.alignment_qformer_config
    assert copy.num_hidden_layers == layers and copy.with_text
    s1_state = load_file(tmp_path / "s1" / "final" / "stage1.safetensors")
    state = bridge.trainable_state_dict()
    assert {k.removeprefix("alignment.") for k in state if k.startswith("alignment.")} == set(s1_state)
    more = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s3", **{
        **shape, "model.init_from": str(tmp_path / "s2"), "model.init_qformer": "false"}))
    train(more, progress=False)
    assert load_bundle(tmp_path / "s3" / "bundle").bridge.cfg.alignment_qformer_config == copy


def test_init_qformer_off_needs_a_stage1_copy(world, tmp_path):
    cfg = load_config(CONFIG_DIR / "tiny_stage2.json", overrides(world, tmp_path / "s2", **{
        "model.init_qformer": "false", "run.steps": 1}))
    with pytest.raises(ValueError, match="keep_alignment"):
        train(cfg, progress=False)
