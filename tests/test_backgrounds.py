"""The plain-background copies of a split that `training.demo.backgrounds` scores the demo on."""

import json

from PIL import Image

from training.demo.backgrounds import FILLS, write_variant
from training.demo.shapes import COLOURS, Scene, write_dataset
from training.evaluate import load_split


def test_variant_repaints_visible_scenes_and_keeps_their_annotations(tmp_path):
    data = tmp_path / "world"
    write_dataset(data, 4, seed=5, n_val=1, n_test=40, n_heldout=1, progress=False)
    scenes = [Scene.from_dict(s) for s in json.loads((data / "scenes_test.json").read_text())["scenes"]]
    out = tmp_path / "white"
    kept = write_variant(data, "test", scenes, FILLS["white"], out)
    assert 0 < len(kept) < len(scenes)  # scenes with a white object are left out
    assert all(o.colour != "white" for s in kept for o in s.objects)
    split = load_split(out, "test")
    assert split.image_ids == [s.id for s in kept]
    assert split.questions and {q["image_id"] for q in split.questions} <= set(split.image_ids)
    image = Image.open(out / "images" / "test" / split.images[0]["file_name"])
    assert image.getpixel((0, 0)) == (255, 255, 255)
    first = kept[0].objects[0]
    cx, cy = (first.box[0] + first.box[2]) // 2, (first.box[1] + first.box[3]) // 2
    if first.shape in ("circle", "square", "hexagon", "diamond", "cross"):  # shapes that cover their centre
        assert image.getpixel((cx, cy)) == COLOURS[first.colour]

    world = write_variant(data, "test", scenes, FILLS["world"], tmp_path / "as-drawn")
    assert world == scenes
    assert (tmp_path / "as-drawn" / "images" / "test" / split.images[0]["file_name"]).read_bytes() == \
        (data / "images" / "test" / split.images[0]["file_name"]).read_bytes()
