"""End to end on the committed demo bundle: a real server, real HTTP, shapes-world test scenes."""

import base64
import io
import json

import httpx
import pytest

from tests.service.conftest import start_server, stop_server
from training.demo.build import DEMO_DIR
from training.demo.shapes import make_scene, render

BUNDLE = DEMO_DIR / "bundle"
pytestmark = pytest.mark.skipif(not (BUNDLE / "qbridge.json").is_file(), reason="no demo bundle installed")


def iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    server = start_server(BUNDLE, tmp_path_factory.mktemp("demo") / "server.log")
    yield server
    stop_server(server)


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def answers(demo_server):
    """Every endpoint on 20 shapes-world test scenes: (scene, caption, detect, vqa) answers."""
    out = []
    with httpx.Client(base_url=demo_server.url, timeout=120) as http:
        assert http.get("/v1/models").json()["data"]
        for i in range(20):
            scene = make_scene(0, "test", i, width=224, height=224)
            image = png_b64(render(scene))
            cap = http.post("/v1/caption", json={"image": image})
            det = http.post("/v1/detect", json={"image": image})
            uploaded = http.post("/v1/images", json={"image": image}).json()
            vqa = http.post("/v1/vqa", json={"image_id": uploaded["image_id"],
                                            "questions": ["how many shapes are there?"]})
            out.append((scene, cap, det, vqa))
    return out


def test_demo_endpoints_answer_on_test_scenes(answers):
    for scene, cap, det, vqa in answers:
        assert cap.status_code == 200 and cap.json()["caption"].strip()
        assert det.status_code == 200, det.text
        for d in det.json()["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
        assert vqa.status_code == 200 and vqa.json()["answers"][0]["answer"].strip()


def detection_match_rate(answers) -> tuple[int, int]:
    matched = total = 0
    for scene, _, det, _ in answers:
        boxes = det.json()["detections"]
        for obj in scene.objects:
            total += 1
            matched += any(d["label"] == obj.label and iou(d["box"], obj.box) >= 0.5 for d in boxes)
    return matched, total


def test_demo_detections_match_most_objects(answers):
    matched, total = detection_match_rate(answers)
    print(json.dumps({"objects": total, "matched_iou50": matched}))
    assert matched / total >= 0.8

