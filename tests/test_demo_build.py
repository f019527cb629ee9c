"""The demo build's machinery: steps that resume, `--only STEP`, and gates that stop the build."""

import json
import shutil

import pytest
import torch

from training.demo.build import NEEDS, STEP_NAMES, GateMissed, Steps, gate, gate_marker, main


def _steps(tmp_path, only=None):
    return Steps({name: 1.0 for name in STEP_NAMES}, tmp_path / "timings.json", only)


def test_a_step_with_its_output_is_skipped_and_only_reruns_one_step_from_nothing(tmp_path):
    ran = []

    def make(name, marker):
        def fn():
            ran.append(name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(name)
        return fn

    markers = {name: tmp_path / name.replace(" ", "_") / "done" for name in STEP_NAMES[:3]}
    steps = _steps(tmp_path)
    for name, marker in markers.items():
        steps.run(name, marker, make(name, marker))
    assert ran == list(STEP_NAMES[:3])
    stale = markers["tokenizer"].parent / "old-checkpoint"
    stale.write_text("x")
    steps = _steps(tmp_path)  # a resumed build skips what is done
    for name, marker in markers.items():
        steps.run(name, marker, make(name, marker))
    assert ran == list(STEP_NAMES[:3])
    steps = _steps(tmp_path, only="tokenizer")  # --only: that step alone, anew, its old outputs cleared
    for name, marker in markers.items():
        steps.run(name, marker, make(name, marker), clear=(marker.parent,))
    assert ran == [*STEP_NAMES[:3], "tokenizer"]
    assert not stale.exists()
    assert set(json.loads((tmp_path / "timings.json").read_text())) == set(STEP_NAMES[:3])


def test_an_interrupted_training_step_keeps_its_checkpoints_when_the_build_resumes(tmp_path):
    run = tmp_path / "stage1"
    checkpoint = run / "checkpoints" / "step-100"
    seen = []

    def fn():
        seen.append(checkpoint.exists())  # what the training run finds to resume from
        (run / "final").mkdir(parents=True, exist_ok=True)

    checkpoint.mkdir(parents=True)
    _steps(tmp_path).run("stage 1", run / "final", fn, clear=(run,), resumable=True)
    assert seen == [True]
    _steps(tmp_path, only="stage 1").run("stage 1", run / "final", fn, clear=(run,), resumable=True)
    assert seen == [True, False]  # --only: anew


def test_only_a_step_whose_inputs_are_missing_says_which_step_to_run_first(tmp_path):
    steps = _steps(tmp_path, only="llm gate")
    with pytest.raises(SystemExit, match="run `qbridge demo build --only 'data'` first"):
        steps.run("data", tmp_path / "data" / "world.json", lambda: None)
    steps = _steps(tmp_path, only="vision")  # the tower reads nothing the LLM steps write
    for name in ("data", "tokenizer", "llm", "llm gate"):
        steps.run(name, tmp_path / name / "done", lambda: pytest.fail("not this step"))


def test_every_step_needs_only_earlier_steps():
    assert set(NEEDS) == set(STEP_NAMES)
    assert all(STEP_NAMES.index(d) < STEP_NAMES.index(s) for s, deps in NEEDS.items() for d in deps)


def test_a_missed_gate_stops_the_build_and_writes_its_figures(tmp_path):
    target = tmp_path / "gates" / "vision.json"
    with pytest.raises(GateMissed, match=r"(?s)gate .vision. missed: shape 0\.500 < 0\.95.*--only vision"):
        gate("vision", {"shape": 0.5}, ["shape 0.500 < 0.95"], target, True, "rerun `--only vision`.")
    written = json.loads(target.read_text())
    assert written == {"gate": "vision", "figures": {"shape": 0.5}, "passed": False, "missed": ["shape 0.500 < 0.95"]}
    assert not gate_marker(target).exists()  # a resumed build measures it again
    gate("vision", {"shape": 0.5}, ["shape 0.500 < 0.95"], target, False, "")  # --ignore-gates: goes on
    assert gate_marker(target).exists()
    gate_marker(target).unlink()
    gate("vision", {"shape": 0.99}, [], target, True, "")
    assert json.loads(target.read_text())["passed"] is True and gate_marker(target).exists()


def test_a_resumed_build_measures_a_missed_gate_again(tmp_path):
    target, runs = tmp_path / "gates" / "llm.json", []

    def measure():
        runs.append(1)
        gate("llm", {"vqa": 0.5}, ["vqa 0.500 < 0.98"], target, True, "")

    for _ in range(2):
        with pytest.raises(GateMissed):
            _steps(tmp_path).run("llm gate", gate_marker(target), measure)
    assert len(runs) == 2


def test_help_lists_the_steps(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--only" in out and "vision gate" in out and "--ignore-gates" in out


def test_quick_build_runs_every_step_and_reports_every_gate(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    assert main(["build", "--out", str(out), "--quick"]) == 0  # tiny parts: gates reported, not enforced
    assert set(json.loads((out / "timings.json").read_text())) == set(STEP_NAMES)
    for part in ("llm", "vision", "stage1"):
        entry = json.loads((out / "gates" / f"{part}.json").read_text())
        assert entry["gate"] in ("llm", "vision", "stage 1") and isinstance(entry["passed"], bool)
    report = (out / "REPORT.md").read_text()
    assert "## Gates" in report and "| vision | shape |" in report and "| llm | vqa_accuracy |" in report
    written = json.loads((out / "report.json").read_text())["written"]  # the bridge's context read back
    assert written["n_scenes"] == 8 and 0.0 <= written["accuracy"] <= 1.0
    assert "## What the bridge writes" in report and f"| all ({written['tokens']}) |" in report
    backgrounds = json.loads((out / "report.json").read_text())["backgrounds"]  # the bundle on plain fills
    assert set(backgrounds) == {"world", "white", "light grey", "mid grey", "dark grey", "black"}
    assert "## Plain backgrounds" in report and "| white (255, 255, 255) |" in report
    tower = json.loads((out / "vision" / "pretrain.json").read_text())["metrics"]["plain_backgrounds"]
    assert tower["steps"] == 4  # the tower learned plain fills after pretraining
    assert "| vision | shape_plain |" in report
    quality = json.loads((out / "report_all.json").read_text())["quality"]  # the levels stage 2 trained on
    assert quality["binning"] == "uniform" and "## Quality levels" in report and "as NoC" in report
    pairs = sum(sum(noise.values()) for noise in quality["noise_by_level"].values())
    assert pairs == len(json.loads((out / "data" / "captions_train_quality.json").read_text())["annotations"])
    assert (out / "stage2" / "bundle" / "qbridge.json").exists()
    from qformer.bundle import load_bundle  # the build prompt-tunes the new task into the bundle

    task = load_bundle(out / "stage2" / "bundle").tasks["largest-colour"]
    assert task.figures["steps"] == 4 and "## A new task by prompt tuning: `largest-colour`" in report
    llm = json.loads((out / "llm" / "pretrain.json").read_text())  # the LLM's second cycle continued the first
    assert llm["init_from"] == str(out / "llm-cycles" / "0") and llm["keep_tables"] and llm["metrics"]["steps"] == 4
    # so did stage 2's three, each with its own rate and batch order; the last one's is the served bundle
    s2 = [json.loads((d / "config.json").read_text()) for d in (
        out / "stage2-cycles" / "0", out / "stage2-cycles" / "1", out / "stage2")]
    assert [(c["run"]["steps"], c["run"]["context_only_steps"], c["optim"]["lr"], c["run"]["seed"]) for c in s2] == [
        (8, 8, 2e-3, 0), (4, 0, 2e-3, 1), (4, 0, 5e-4, 2)]
    assert [c["model"]["init_from"] for c in s2] == [str(out / "stage1"), str(out / "stage2-cycles" / "0"),
                                                    str(out / "stage2-cycles" / "1")]
    cycles = [json.loads((d / "config.json").read_text()) for d in (out / "stage1-cycles" / "0", out / "stage1")]
    assert [c["run"]["steps"] for c in cycles] == [6, 4]  # stage 1's second cosine cycle continues the first
    assert cycles[1]["model"]["init_from"] == str(out / "stage1-cycles" / "0") and not cycles[0]["model"]["init_from"]
    bundle = json.loads((out / "stage2" / "bundle" / "qbridge.json").read_text())["config"]
    assert bundle["alignment_qformer"] and not bundle["qformer"]["with_text"]  # stage 1's copy does ITC/ITM
    # stage 2's own Q-Former cross-attends in every layer, from scratch; the copy keeps stage 1's shape
    copy = bundle["alignment_qformer_config"]
    assert bundle["qformer"]["cross_attention_every"] == 1 != copy["cross_attention_every"]
    ablation = json.loads((out / "ablation.json").read_text())  # each variant once per seed, and their mean
    for variant in ("a_no_conditioning", "b_filtered", "c_quality_top"):
        runs = ablation[variant]["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        assert ablation[variant]["precision"] == pytest.approx(sum(r["precision"] for r in runs) / 2)
        config = json.loads((out / "ablation" / "seed1" / variant / "config.json").read_text())
        assert config["run"]["seed"] == 1 and config["model"]["init_from"] == str(out / "ablation" / "context")
    # one step again, alone: the rest stays as it was
    before = (out / "report.json").stat().st_mtime_ns
    assert main(["build", "--out", str(out), "--quick", "--only", "vision gate"]) == 0
    assert (out / "report.json").stat().st_mtime_ns == before
    # a built bundle unpacks into a build directory whose later steps rerun on its parts
    again, installed = tmp_path / "again", tmp_path / "installed"  # laid out as `install` leaves qformer/demo/
    shutil.copytree(out / "stage2" / "bundle", installed / "bundle")
    shutil.copy(out / "report_all.json", installed)
    assert main(["unpack", "--bundle", str(installed / "bundle"), "--out", str(again)]) == 0
    restored = json.loads((again / "restored.json").read_text())["steps"]
    assert set(restored) == {"llm gate", "vision gate", "stage 1 gate", "llm", "ablation"}
    assert json.loads((again / "ablation.json").read_text()) == json.loads((out / "ablation.json").read_text())
    from safetensors.torch import load_file

    original, restored = (load_file(d / "stage1" / "final" / "stage1.safetensors") for d in (out, again))
    assert original.keys() == restored.keys()
    assert all(torch.allclose(original[k], restored[k], atol=1e-2, rtol=1e-3) for k in original)  # kept in fp16
    for f in ("llm/model.safetensors", "llm/tokenizer.json", "vision/model.safetensors"):
        assert (again / f).read_bytes() == (out / f).read_bytes()
    assert (again / "stage2" / "bundle" / "model.safetensors").read_bytes() == (
        out / "stage2" / "bundle" / "model.safetensors").read_bytes()  # stage 2's output is the installed bundle
    shutil.copytree(out / "data", again / "data")
    assert main(["build", "--out", str(again), "--quick", "--only", "stage 1 gate"]) == 0
    assert "i2t_r1" in json.loads((again / "gates" / "stage1.json").read_text())["figures"]
    assert "stage 1 gate" not in json.loads((again / "restored.json").read_text())["steps"]  # measured here now
    assert main(["build", "--out", str(again), "--quick", "--only", "evaluation"]) == 0  # writes the report
    report = (again / "REPORT.md").read_text()
    assert "not measured by this build" in report and "(llm gate, vision gate) are copied" in report
    # install replaces the bundle, the report and the golden figures, and leaves the rest of the directory
    import training.demo.build as build

    monkeypatch.setattr(build, "write_golden", lambda bundle, target: {"measured": {}})
    target = tmp_path / "demo-dir"
    (target / "examples").mkdir(parents=True)
    (target / "examples" / "x.png").write_bytes(b"png")
    (target / "bundle").mkdir()
    (target / "bundle" / "stale.json").write_text("{}")
    build.install(again, target)
    assert (target / "examples" / "x.png").read_bytes() == b"png" and (target / "REPORT.md").is_file()
    assert (target / "bundle" / "qbridge.json").is_file() and not (target / "bundle" / "stale.json").exists()


def test_unpack_refuses_a_bundle_without_a_stage1_copy(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "qbridge.json").write_text(json.dumps({"config": {"alignment_qformer": False}}))
    with pytest.raises(SystemExit, match="no stage-1 copy"):
        main(["unpack", "--bundle", str(bundle), "--out", str(tmp_path / "out")])


def test_the_small_ablation_draws_one_caption_of_each_of_the_first_scenes():
    from training.demo.build import one_caption_a_scene

    captions = [{"image_id": i, "caption": f"{i}-{k}"} for k in range(3) for i in (5, 2, 9, 7)]
    drawn = one_caption_a_scene(captions, 3, seed=0)
    assert [a["image_id"] for a in drawn] == [2, 5, 7]  # the first three scenes by id, one caption each
    assert all(a in captions for a in drawn) and drawn == one_caption_a_scene(captions, 3, seed=0)
    first = {one_caption_a_scene(captions, 1, seed=s)[0]["caption"] for s in range(20)}
    assert first == {"2-0", "2-1", "2-2"}  # the draw varies with the seed
