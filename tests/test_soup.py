"""Model soups (training.soup): uniform mean, greedy never below its best ingredient, unrelated bundles refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qformer.bundle import BundleError, load_bundle, save_bundle
from tests.tiny import tiny_bridge
from training.soup import main, make_soup

KEY = "language_projection.weight"


def write(tmp_path, name, shift, seed=0, **kw):
    bridge, tok, proc = tiny_bridge(seed=seed, **kw)
    with torch.no_grad():
        torch.manual_seed(0)  # one "initialisation": every ingredient differs from it by `shift` in the projection
        bridge.language_projection.weight.copy_(torch.randn_like(bridge.language_projection.weight) + shift)
    return save_bundle(bridge, tok, proc, tmp_path / name)


def projection(path):
    return load_file(path / "model.safetensors")[KEY]


def test_a_uniform_soup_is_the_mean_of_its_ingredients(tmp_path):
    paths = [write(tmp_path, n, s) for n, s in (("a", 0.0), ("b", 1.0), ("c", 5.0))]
    record = make_soup(paths, tmp_path / "soup", log=lambda *_: None)
    want = sum(projection(p) for p in paths) / 3
    torch.testing.assert_close(projection(tmp_path / "soup"), want)
    assert record["kept"] == [str(p) for p in paths]
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["recipe"] == "uniform"
    load_bundle(tmp_path / "soup")  # a bundle like any other


def test_a_greedy_soup_keeps_an_ingredient_only_if_the_score_holds(tmp_path):
    a, b, c = (write(tmp_path, n, s) for n, s in (("a", 0.0), ("b", 0.2), ("c", 8.0)))
    target = projection(a) + 0.1  # the held-out optimum lies between a and b; c is far off

    def score(bundle):
        return -(bundle.bridge.language_projection.weight.detach() - target).pow(2).mean().item()

    record = make_soup([c, b, a], tmp_path / "soup", greedy=True, score=score, log=lambda *_: None)
    assert set(record["kept"]) == {str(a), str(b)}
    assert record["soup_score"] >= max(record["scores"].values())
    torch.testing.assert_close(projection(tmp_path / "soup"), (projection(a) + projection(b)) / 2)


def test_bundles_between_other_frozen_parts_are_refused(tmp_path):
    a = write(tmp_path, "a", 0.0)
    other = write(tmp_path, "other", 0.0, seed=1)  # another random vision tower and LLM
    with pytest.raises(BundleError, match="frozen vision differs"):
        make_soup([a, other], tmp_path / "soup", log=lambda *_: None)


def test_bundles_of_another_config_are_refused(tmp_path):
    a = write(tmp_path, "a", 0.0)
    levels = write(tmp_path, "levels", 0.0, num_quality_levels=2)
    with pytest.raises(BundleError, match="config differs .*num_quality_levels"):
        make_soup([a, levels], tmp_path / "soup", log=lambda *_: None)


def test_the_command_needs_data_for_a_greedy_soup_and_reports_refusals(tmp_path, capsys):
    a, b = write(tmp_path, "a", 0.0), write(tmp_path, "b", 1.0)
    with pytest.raises(SystemExit):
        main([str(a), str(b), "--out", str(tmp_path / "soup"), "--greedy"])
    assert "--greedy needs --data" in capsys.readouterr().err
    assert main([str(a), "--out", str(tmp_path / "soup")]) == 2
    assert "at least two bundles" in capsys.readouterr().err
    assert main([str(a), str(b), "--out", str(tmp_path / "soup")]) == 0


def test_scoring_leaves_no_trace_in_the_soups_files(tmp_path):
    """A greedy soup's scoring tokenizes with padding and truncation; the soup's tokenizer is still its
    ingredients' (a fast tokenizer keeps the last call's padding and truncation, and would save them), and its
    files are those of a soup that scored nothing."""
    a, b = (write(tmp_path, n, s) for n, s in (("a", 0.0), ("b", 0.2)))

    def score(bundle):
        bundle.tokenizer(["a red circle", "a"], padding=True, truncation=True, max_length=4)
        return 0.0

    make_soup([a, b], tmp_path / "greedy", greedy=True, score=score, log=lambda *_: None)
    make_soup([a, b], tmp_path / "uniform", log=lambda *_: None)  # nothing scored
    assert (tmp_path / "greedy" / "tokenizer" / "tokenizer.json").read_bytes() == (
        a / "tokenizer" / "tokenizer.json").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "greedy" / "tokenizer" / name).read_bytes() == (
            tmp_path / "uniform" / "tokenizer" / name).read_bytes(), name
