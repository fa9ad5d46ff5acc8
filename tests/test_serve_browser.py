"""The vild-serve page in a real browser (Debian's chromium driven by playwright) against a real server.

``make test-browser`` installs chromium (apt) and playwright (pip) and runs this; elsewhere it is skipped.
"""
import base64
import importlib.util
import io
import json
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HOW = "the real-browser test of the vild-serve page needs Debian's chromium and playwright: run `make test-browser`"
if not (CHROMIUM and importlib.util.find_spec("playwright") and importlib.util.find_spec("fastapi")):
    if os.environ.get("VILD_BROWSER_TEST"):  # make test-browser: a missing browser is a failure, not a skip
        raise RuntimeError(f"chromium ({CHROMIUM}) or playwright missing: {HOW}")
    pytest.skip(HOW, allow_module_level=True)

from playwright.sync_api import sync_playwright  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_load import ServerProcess  # noqa: E402

from vild.synthetic.demo_picture import novel_val_images  # noqa: E402
from vild.synthetic.world import NOVEL_NAMES, generate_world  # noqa: E402

DEMO = ROOT / "tests" / "assets" / "demo_model" / "model.pth"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(str(DEMO), tmp_path_factory.mktemp("server"), ("--threads", "1")) as s:
        yield s


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """The image with the most novel shapes of a few from a world the demo model never saw."""
    w = generate_world(str(tmp_path_factory.mktemp("browser_world")), seed=11, num_train=0, num_val=8, image_size=128)
    return novel_val_images(w, 1)[0]


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        pg = browser.new_page()
        pg.requests, pg.errors = [], []
        pg.on("request", lambda r: pg.requests.append(r.url))
        pg.on("pageerror", lambda e: pg.errors.append(str(e)))
        pg.goto(server.url + "/")
        pg.wait_for_function("() => document.getElementById('status').textContent.startsWith('Ready')",
                             timeout=30_000)
        yield pg
        browser.close()


def _api(server, png: bytes, vocabulary: str, threshold: float) -> dict:
    body = json.dumps({"image": base64.b64encode(png).decode(), "vocabulary": vocabulary,
                       "score_threshold": threshold, "masks": True}).encode()
    req = urllib.request.Request(server.url + "/detect", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _canvas(page) -> np.ndarray:
    url = page.evaluate("() => document.getElementById('canvas').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_upload_type_and_see_detections_drawn_and_listed(page, server, scene):
    vocab = ",".join(NOVEL_NAMES)
    page.fill("#vocab", vocab)
    page.set_input_files("#file", str(scene))
    page.wait_for_selector("body[data-state=done]", timeout=30_000)
    threshold = float(page.input_value("#threshold"))
    expected = _api(server, scene.read_bytes(), vocab, threshold)["detections"]
    assert expected, "the demo model finds novel shapes in this scene"

    items = page.locator("#detections li")
    assert items.count() == len(expected) == int(page.get_attribute("#canvas", "data-drawn"))
    listed = [(items.nth(i).get_attribute("data-label"), float(items.nth(i).get_attribute("data-score")))
              for i in range(items.count())]
    assert listed == [(d["label"], d["score"]) for d in expected]
    assert page.text_content("#count") == f"{len(expected)} detection{'s' if len(expected) != 1 else ''}"

    # drawn: each box's left edge in its label's colour, the masks tinting the image inside them
    drawn, original = _canvas(page), np.asarray(Image.open(scene).convert("RGB"))
    s = int(page.get_attribute("#canvas", "data-scale"))  # small images are shown enlarged
    assert drawn.shape == (original.shape[0] * s, original.shape[1] * s, 3)
    palette = page.evaluate("() => window.vild.palette")
    names = vocab.split(",")
    edge_hits = 0
    for d in expected:
        color = np.array([int(palette[names.index(d["label"]) % len(palette)][i:i + 2], 16) for i in (1, 3, 5)])
        x, y = round(d["box"]["xmin"] * s), round((d["box"]["ymin"] + d["box"]["ymax"]) / 2 * s)
        # the stroke straddles the box's edge: any of the pixels beside it may carry the unblended colour
        edge_hits += int(min(np.abs(drawn[y, c].astype(int) - color).max() for c in (x - 1, x, x + 1)) <= 8)
    assert edge_hits >= len(expected) / 2, f"only {edge_hits} of {len(expected)} box edges in their colour"
    masks = np.stack([mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
                      for d in expected]).any(0)
    changed = np.abs(drawn[s // 2::s, s // 2::s].astype(int) - original.astype(int)).max(-1) > 10
    assert changed[masks].mean() > 0.9 and changed.mean() < 0.9

    # the page decodes COCO RLE as pycocotools does
    areas = page.evaluate("() => window.vild.state.result.detections.map(d => window.vild.maskArea(d.mask))")
    assert areas == [int(mask_utils.area({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()}))
                     for d in expected]

    # the slider filters what is drawn and listed, without asking the server again
    posts = sum(u.endswith("/detect") for u in page.requests)
    page.locator("#threshold").fill(str(sorted(d["score"] for d in expected)[len(expected) // 2]))
    top = float(page.input_value("#threshold"))  # as the slider's steps have it
    page.wait_for_function(f"() => document.querySelectorAll('#detections li').length === "
                           f"{sum(d['score'] >= top for d in expected)}")
    assert sum(u.endswith("/detect") for u in page.requests) == posts
    assert page.get_attribute("#canvas", "data-drawn") == str(sum(d["score"] >= top for d in expected))

    assert all(u.startswith(server.url + "/") for u in page.requests), "the page fetched from elsewhere"
    assert not page.errors


def test_a_file_that_is_no_image_shows_the_servers_reason(page, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    page.fill("#vocab", "star")
    page.set_input_files("#file", str(notes))
    page.wait_for_selector("body[data-state=error]", timeout=30_000)
    assert page.text_content("#status").startswith("400: the upload is not an image")
    assert not page.errors
