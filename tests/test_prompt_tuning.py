"""Task prompts (qformer.tasks) and prompt tuning (training/prompt.py, `qbridge train prompt`) on a tiny
random bundle and a tiny shapes world with the demo's new task (training/demo/new_task.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qformer.bundle import BundleError, load_bundle, save_bundle
from qformer.tasks import TaskPrompt, bridge_sha256, check_name, load_tasks, save_task, with_task
from tests.tiny import tiny_bridge
from training.demo import new_task, shapes


def test_a_task_round_trips_through_the_bundle(tmp_path):
    bridge, tok, proc = tiny_bridge()
    path = save_bundle(bridge, tok, proc, tmp_path / "b")
    vectors = torch.randn(4, bridge.llm.config.hidden_size)
    save_task(path, TaskPrompt("count-red", vectors, "how many red shapes", "how many red shapes are there?",
                               {"accuracy_after": 0.5}))
    (task,) = load_bundle(path).tasks.values()
    assert (task.name, task.question, task.figures, task.num_vectors) == (
        "count-red", "how many red shapes are there?", {"accuracy_after": 0.5}, 4)
    assert torch.equal(task.vectors, vectors)


def test_task_files_that_do_not_fit_are_refused_with_their_name(tmp_path):
    bridge, tok, proc = tiny_bridge()
    path = save_bundle(bridge, tok, proc, tmp_path / "b")
    width = bridge.llm.config.hidden_size
    (path / "tasks").mkdir()
    sha = bridge_sha256(path)
    save_file({"vectors": torch.zeros(2, width + 1)}, str(path / "tasks" / "wide.safetensors"),
              metadata={"name": "wide", "bridge_sha256": sha})
    with pytest.raises(BundleError, match=r"wide.safetensors: vectors \(2, 49\) do not fit"):
        load_bundle(path)
    save_file({"vectors": torch.zeros(2, width)}, str(path / "tasks" / "wide.safetensors"), metadata={"name": "other", "bridge_sha256": sha})
    with pytest.raises(BundleError, match="names task 'other', not 'wide'"):
        load_bundle(path)
    save_file({"vectors": torch.zeros(2, width), "x": torch.zeros(1)}, str(path / "tasks" / "wide.safetensors"),
              metadata={"name": "wide", "bridge_sha256": sha})
    with pytest.raises(BundleError, match="one tensor, 'vectors'"):
        load_bundle(path)
    save_file({"vectors": torch.zeros(2, width)}, str(path / "tasks" / "wide.safetensors"),
              metadata={"name": "wide", "bridge_sha256": "0" * 64})
    with pytest.raises(BundleError, match="trained against other bridge weights.*--name wide"):
        load_bundle(path)
    assert load_tasks(tmp_path / "nowhere", width) == {}


@pytest.mark.parametrize("bad", ["", "Upper", "-lead", "a b", "x" * 65, "../up"])
def test_task_names_are_plain(bad):
    with pytest.raises(ValueError, match="task name"):
        check_name(bad)


def test_with_task_appends_the_vectors_to_every_row():
    q = torch.randn(3, 5, 8)
    v = torch.randn(2, 8)
    out = with_task(q, v)
    assert out.shape == (3, 7, 8) and torch.equal(out[:, :5], q) and torch.equal(out[1, 5:], v)
    assert with_task(q, None) is q
    assert with_task(q[0], v).shape == (7, 8)  # one image's queries


def test_the_new_task_asks_only_where_the_largest_object_is_clear():
    O = shapes.Obj
    clear = shapes.Scene(1, 64, 64, "grey", (O("circle", "red", "large", (0, 0, 30, 30)),
                                             O("star", "blue", "small", (40, 40, 50, 50))))
    close = shapes.Scene(2, 64, 64, "grey", (O("circle", "red", "large", (0, 0, 20, 20)),
                                             O("star", "blue", "large", (30, 30, 51, 51))))
    alone = shapes.Scene(3, 64, 64, "grey", (O("square", "green", "small", (5, 5, 12, 12)),))
    assert [new_task.largest_colour(s) for s in (clear, close, alone)] == ["red", None, "green"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    data = root / "data"
    shapes.write_dataset(data, 24, seed=0, n_val=0, n_test=8, n_heldout=0, size=(32, 32), progress=False)
    counts = new_task.write_task(data)
    bridge, tok, proc = tiny_bridge()
    return data, save_bundle(bridge, tok, proc, root / "bundle"), counts


def test_prompt_tuning_trains_only_the_vectors_and_writes_them_into_the_bundle(world):
    from training.prompt import train_prompt

    data, bundle_dir, counts = world
    assert counts["train"] > 0 and counts["test"] > 0
    weights = load_file(str(bundle_dir / "model.safetensors"))
    task = train_prompt(bundle_dir, data, "largest-colour", questions=new_task.FILES[0], answers=new_task.FILES[1],
                        steps=30, vectors=3, lr=0.1, batch_size=8, warmup=2, eval_n=8, progress=False)
    f = task.figures
    assert f["trained_parameters"] == 3 * 48 and f["train_questions"] == counts["train"]
    assert f["eval_questions"] == counts["test"] and 0.0 <= f["accuracy_before"] <= 1.0
    assert f["final_loss"] < f["first_loss"]  # it learns (the answers are a handful of colours)
    assert task.question == new_task.QUESTION
    reloaded = load_bundle(bundle_dir)
    assert torch.equal(reloaded.tasks["largest-colour"].vectors, task.vectors)
    after = load_file(str(bundle_dir / "model.safetensors"))
    assert weights.keys() == after.keys() and all(torch.equal(weights[k], after[k]) for k in weights)  # all else frozen


def test_prompt_tuning_names_missing_task_files(world, tmp_path):
    from training.prompt import train_prompt

    data, bundle_dir, _ = world
    with pytest.raises(FileNotFoundError, match="questions_nothing_train.json"):
        train_prompt(bundle_dir, data, "t", questions="questions_nothing_{split}.json", steps=1, progress=False)
    with pytest.raises(ValueError, match="task name"):
        train_prompt(bundle_dir, data, "Bad Name", steps=1, progress=False)


def test_the_cli_trains_a_task(world, capsys):
    from training.train import main

    data, bundle_dir, _ = world
    rc = main(["prompt", "--model", str(bundle_dir), "--data", str(data), "--name", "cli-task",
               "--questions", new_task.FILES[0], "--answers", new_task.FILES[1], "--steps", "2", "--vectors", "2",
               "--batch-size", "4", "--eval-n", "4", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "task cli-task: accuracy" in out and "2 learned vectors" in out
    assert json.loads(json.dumps(load_bundle(bundle_dir).tasks["cli-task"].figures))["steps"] == 2
