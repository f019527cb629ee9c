"""The alignment figures' edited captions: one attribute of the single object changed, nothing else."""

import pytest

from training.demo.alignment_eval import edited_caption
from training.demo.shapes import COLOURS, SHAPES, SIZES, caption, make_scene


@pytest.mark.parametrize("attribute, values", [("colour", list(COLOURS)), ("shape", list(SHAPES)),
                                               ("size", list(SIZES))])
def test_an_edited_caption_changes_one_attribute(attribute, values):
    scene = make_scene(0, "test", 3, max_objects=1)
    (obj,) = scene.objects
    old = getattr(obj, attribute)
    new = values[(values.index(old) + 1) % len(values)]
    true = caption(scene, "normal")
    assert f" {old}" in true
    assert edited_caption(scene, attribute) == true.replace(f" {old}", f" {new}")
