"""The LLM's oracle gate: boxes written as numbers read back by the bridge's own parser, and the gate."""

from qformer.boxes import BoxCodec
from training.demo.oracle import GATE, gate_failures, lookup_split, numbers_to_locations
from training.demo.pretrain import detection_text
from training.demo.shapes import make_scene, reading_order


def test_detection_text_as_numbers_parses_back_to_the_scene_boxes():
    codec = BoxCodec(64)
    scene = make_scene(0, "val", 3)
    text = detection_text(scene, 64).removeprefix("detect: ")
    assert numbers_to_locations("red circle 12 40 30 61; blue square 1 2 3 4") == (
        "red circle<loc_12><loc_40><loc_30><loc_61>; blue square<loc_1><loc_2><loc_3><loc_4>")
    found = codec.decode(numbers_to_locations(text), scene.width, scene.height)
    assert [d.label for d in found] == [o.label for o in reading_order(scene)]
    for d, o in zip(found, reading_order(scene)):
        assert all(abs(a - b) <= scene.width / 64 for a, b in zip(d.box, o.box))


def test_gate_lists_what_is_missed():
    perfect = {k: 1.0 for k in GATE}
    assert gate_failures(perfect) == []
    assert gate_failures({**perfect, "detection_map50": 0.015}) == ["detection_map50 0.015 < 0.95"]


def test_lookup_split_separates_scenes_of_one_object_from_scenes_of_several():
    one, three = make_scene(0, "val", 0), None
    index = 1
    while three is None or len(one.objects) != 1:
        s = make_scene(0, "val", index)
        if len(s.objects) == 1:
            one = s
        elif len(s.objects) >= 3 and three is None:
            three = s
        index += 1
    scenes = {one.id: one, three.id: three}
    annotations = [{"question_id": 1, "image_id": one.id, "question_type": "colour"},
                   {"question_id": 2, "image_id": three.id, "question_type": "shape"},
                   {"question_id": 3, "image_id": three.id, "question_type": "size"},
                   {"question_id": 4, "image_id": three.id, "question_type": "count"}]  # not a look-up
    split = lookup_split({1: 1.0, 2: 1.0, 3: 0.0, 4: 0.0}, annotations, scenes)
    assert split == {"vqa_lookup_single_object": 1.0, "vqa_lookup_multi_object": 0.5}
