"""The playground page in a real browser (Playwright driving Debian's chromium): upload, caption, boxes.

The server runs in this process (uvicorn on a thread) with a stub backend that writes a known detection
sequence, so the boxes to draw are known. CI installs the browser with `apt-get install -y chromium`.
    .venv/bin/python -m pytest tests/service/test_service_playground.py -q
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from conftest import StubBackend, encode, free_port, make_app, scene_image

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is absent (apt-get install chromium)")

SEQUENCE = "red circle<loc_4><loc_4><loc_20><loc_20>; blue square<loc_22><loc_10><loc_30><loc_28>"


def answer(prompt: str) -> str:
    if prompt.startswith("detect"):
        return SEQUENCE
    if prompt.startswith("question"):
        return "red"
    return "a red circle and a blue square"


@pytest.fixture(scope="module")
def page_server(bundle):
    import uvicorn

    app = make_app(bundle, StubBackend(answer))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(10)


def test_playground_captions_and_draws_boxes(page_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene_image((320, 240), seed=3)))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            requests: list[str] = []
            page.on("request", lambda req: requests.append(req.url))
            page.goto(page_server + "/")
            page.wait_for_function("document.querySelectorAll('#quality option').length === 3")
            assert page.locator("#quality").input_value() == "2"  # the default level, from /v1/models
            page.set_input_files("#file", str(image))
            page.wait_for_function("!document.querySelector('#run').disabled")

            page.select_option("#quality", "1")
            page.click("#run")
            page.wait_for_function("document.querySelector('#result').textContent.includes('a red circle')")
            assert "quality q1" in page.text_content("#result")

            page.check("input[value=vqa]")
            page.fill("#question", "what colour is the circle?")
            page.click("#run")
            page.wait_for_function("document.querySelector('#result').textContent.includes('→ red')")

            page.check("input[value=detect]")
            page.click("#run")
            page.wait_for_function("document.querySelectorAll('#boxes li').length === 2")
            items = page.locator("#boxes li").all_text_contents()
            assert items[0].startswith("red circle") and items[1].startswith("blue square")
            # The boxes are drawn: the first box's colour (magenta) is on the canvas along its top edge.
            drawn = page.evaluate("""() => {
                const c = document.querySelector('#canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let magenta = 0;
                for (let i = 0; i < d.length; i += 4) {
                    if (d[i] > 230 && d[i + 1] < 40 && d[i + 2] > 230) magenta++;
                }
                return {magenta, width: c.width, height: c.height};
            }""")
            assert (drawn["width"], drawn["height"]) == (320, 240)
            assert drawn["magenta"] > 100, drawn
            assert not errors, errors
            assert all(u.startswith(page_server) for u in requests), requests  # nothing fetched elsewhere
        finally:
            browser.close()
