"""The demo's vision tower: dense targets, a tiny pretraining run that learns and loads as the bridge loads it,
and the gate's probes."""

import pytest
import torch

from qformer.bridge import feature_tokens, load_vision_encoder, vision_hidden_size
from training.demo.shapes import COLOURS, SHAPES, SIZES, Obj, Scene
from training.demo.vision import (
    ATTRIBUTES, TINY, _corners, dense_targets, gate_failures, image_processor, pretrain_tower, probe_saved,
    tokens_of, tune_plain_backgrounds,
)


def test_dense_targets_label_covered_cells_and_centre_cells():
    scene = Scene(1, 128, 128, "grey", (Obj("circle", "red", "large", (0, 0, 40, 40)),
                                        Obj("star", "blue", "small", (97, 97, 107, 107))))
    t = dense_targets(scene, 8)  # 16 px cells
    none = {a: len(v) for a, v in ATTRIBUTES.items()}
    grid = t["shape"].view(8, 8)
    # the circle covers the centres (8 and 24 px) of cells (0..1, 0..1); the star covers no cell centre but
    # labels its own cell
    assert (grid[:2, :2] == SHAPES.index("circle")).all()
    assert grid[6, 6] == SHAPES.index("star") and t["colour"].view(8, 8)[6, 6] == list(COLOURS).index("blue")
    assert t["size"].view(8, 8)[6, 6] == list(SIZES).index("small")
    assert (grid == none["shape"]).sum() == 64 - 4 - 1
    assert t["centre"].sum() == 2 and t["centre"].view(8, 8)[1, 1] == 1 and t["centre"].view(8, 8)[6, 6] == 1
    torch.testing.assert_close(t["box"][1 * 8 + 1], torch.tensor([0.25, 0.25, 40 / 128, 40 / 128]))
    # the box target decodes back to the box
    corners = _corners(t["box"][[9, 54]], torch.tensor([9, 54]), 8) * 128
    torch.testing.assert_close(corners, torch.tensor([[0.0, 0, 40, 40], [97, 97, 107, 107]]))


def test_tiny_tower_learns_saves_and_loads_as_the_bridge_loads_it(tmp_path):
    out = tmp_path / "vision"
    m = pretrain_tower(out, 30, image_size=64, lr=3e-3, probe_scenes=(0, 0), progress=False, **TINY)
    assert m["final_loss"] < m["first_loss"] - 0.5
    assert set(m["final_losses"]) == {"shape_loss", "colour_loss", "size_loss", "centre_loss", "box_loss"}
    tower = load_vision_encoder(str(out))
    assert type(tower).__name__ == "ResNetModel" and vision_hidden_size(tower) == 32
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels).last_hidden_state
        assert hidden.shape == (2, 32, 4, 4)  # stride 16
        assert torch.equal(tokens_of(tower, pixels), tokens_of(m["model"].eval(), pixels))
        assert feature_tokens(hidden).shape == (2, 16, 32)
    figures = probe_saved(out, scenes=(24, 12))
    assert set(figures) >= {"shape", "colour", "size", "centre_recall", "centre_precision", "box_iou50"}
    assert all(0 <= figures[k] <= 1 for k in ("shape", "colour", "size", "centre_recall", "box_iou50"))


def test_gate_names_each_missed_figure():
    world = {"shape": 0.99, "colour": 0.99, "size": 0.99, "centre_recall": 0.99, "centre_precision": 0.99}
    plain = {f"{k}_plain": 0.9 for k in world}
    assert gate_failures({**world, **plain}) == []
    missed = gate_failures({**world, "shape": 0.5, **plain, "colour_plain": 0.69})
    assert missed == ["shape 0.500 < 0.95", "colour_plain 0.690 < 0.85"]
    missed = gate_failures({"shape": 0.99, "colour": 0.99, "size": 0.99, "centre_recall": 0.9498, **plain})
    assert missed == ["centre_recall 0.9498 < 0.95", "centre_precision nan < 0.95"]  # never "0.950 < 0.95"


@pytest.mark.parametrize("attribute", list(ATTRIBUTES))
def test_every_attribute_has_a_none_class(attribute):
    scene = Scene(1, 64, 64, "grey", ())
    assert (dense_targets(scene, 4)[attribute] == len(ATTRIBUTES[attribute])).all()


def test_linear_probe_reads_an_encoded_attribute_and_not_a_missing_one():
    import torch.nn.functional as F

    from training.demo.vision import _fit_linear

    g = torch.Generator().manual_seed(0)
    colour, shape = torch.randint(0, 8, (600,), generator=g), torch.randint(0, 7, (600,), generator=g)
    x = torch.cat([F.one_hot(colour, 8).float() * 3, torch.randn(600, 8, generator=g)], 1)  # colours in, shapes not
    lin = _fit_linear(x[:400], colour[:400], F.cross_entropy, 8)
    assert (lin(x[400:]).argmax(-1) == colour[400:]).float().mean() > 0.95
    lin = _fit_linear(x[:400], shape[:400], F.cross_entropy, 7)
    assert (lin(x[400:]).argmax(-1) == shape[400:]).float().mean() < 0.3


def test_plain_background_tuning_moves_plain_fills_towards_grey_and_keeps_batch_norm(tmp_path):
    from dataclasses import replace
    from random import Random

    from training.demo.shapes import make_scene, random_fill, render

    tower = pretrain_tower(None, 20, image_size=64, lr=3e-3, probe_scenes=(0, 0), progress=False, **TINY)["model"]
    processor = image_processor(64)
    scenes = [make_scene(0, "val", i, width=64, height=64) for i in range(16)]
    rng = Random(0)
    plain = processor(images=[render(s, random_fill(s, rng)) for s in scenes], return_tensors="pt").pixel_values
    grey = processor(images=[render(replace(s, background="grey")) for s in scenes], return_tensors="pt").pixel_values

    def gap() -> float:
        with torch.no_grad():
            return (tokens_of(tower.eval(), plain) - tokens_of(tower.eval(), grey)).square().mean().item()

    stats = [b.clone() for name, b in tower.named_buffers() if "running" in name]
    before = gap()
    m = tune_plain_backgrounds(tower, processor, 30, batch_size=8, lr=3e-3, progress=False)
    assert gap() < 0.5 * before
    assert 0 < m["plain_loss"] and 0 <= m["world_loss"] < m["plain_loss"] * 10
    after = [b for name, b in tower.named_buffers() if "running" in name]
    assert all(torch.equal(a, b) for a, b in zip(stats, after))  # eval mode: batch norm's statistics stay
    assert not any(p.requires_grad for p in tower.parameters())
