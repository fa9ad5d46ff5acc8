"""vild-serve's HTTP API through FastAPI's test client: detections, batching, limits, bad input, keys, overload."""
import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

pytest.importorskip("fastapi", reason="vild-serve needs the serve extra: pip install -e '.[dev]'")
from fastapi.testclient import TestClient  # noqa: E402

from vild import Detector  # noqa: E402
from vild.io import decode_image  # noqa: E402
from vild.engine.checkpoint import load_checkpoint  # noqa: E402
from vild.serve import Limits, create_app  # noqa: E402
from vild.serve.parsing import DetectRequest  # noqa: E402
from vild.serve.runner import DetectorRunner  # noqa: E402
from vild.synthetic.world import NOVEL_NAMES, generate_world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = Path(__file__).resolve().parent / "assets" / "demo_model" / "model.pth"
VOCAB = ",".join(NOVEL_NAMES)
# a low threshold on the demo model's calibrated confidences, so that requests see several boxes
SHOW = 0.005


@pytest.fixture(scope="module")
def det() -> Detector:
    d = Detector.from_checkpoint(DEMO, device="cpu", score_thresh=SHOW, max_dets=100)
    d.teacher.write_cache = False
    return d


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[bytes]:
    """Six 128-px scenes of the synthetic world (novel shapes among them), PNG-encoded."""
    w = generate_world(str(tmp_path_factory.mktemp("serve_world")), seed=11, num_train=0, num_val=6, image_size=128)
    return [p.read_bytes() for p in sorted(Path(w["images_val"]).glob("*.png"))]


@pytest.fixture()
def client(det):
    with TestClient(create_app(det)) as c:
        yield c


def upload(client, png: bytes, vocabulary=VOCAB, **fields):
    data = {"vocabulary": vocabulary, **{k: str(v) for k, v in fields.items()}}
    return client.post("/detect", files={"image": ("scene.png", png, "image/png")}, data=data)


def wait_until(cond, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the server"
        time.sleep(0.005)


def test_detect_multipart_answers_in_the_pipeline_shape_with_masks(client, pngs, det):
    r = upload(client, pngs[0], masks="true", score_threshold=SHOW)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (128, 128) and body["vocabulary"] == list(NOVEL_NAMES)
    dets = body["detections"]
    assert dets, "the demo model finds novel shapes in this scene"
    scores = [d["score"] for d in dets]
    assert scores == sorted(scores, reverse=True) and min(scores) >= SHOW
    for d in dets:
        assert set(d) == {"score", "label", "box", "mask"} and d["label"] in NOVEL_NAMES
        b = d["box"]
        assert set(b) == {"xmin", "ymin", "xmax", "ymax"} and 0 <= b["xmin"] < b["xmax"] <= 128
        m = mask_utils.decode({"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode()})
        ys, xs = m.nonzero()
        assert m.shape == (128, 128)
        # a box shown at the default threshold has a shape in it; one far below (background) may have none
        assert len(ys) > 0 or d["score"] < det.display_score_thresh
        if len(ys):  # the mask lies in its box (a pixel of slack for the paste's rounding)
            assert xs.min() >= b["xmin"] - 1 and xs.max() <= b["xmax"] + 1 and ys.max() <= b["ymax"] + 1
    assert any(d["score"] >= det.display_score_thresh for d in dets)


def test_json_base64_and_list_vocabulary_give_the_multipart_answer(client, pngs):
    form = upload(client, pngs[1], max_detections=3).json()
    b64 = "data:image/png;base64," + base64.b64encode(pngs[1]).decode()
    body = client.post("/detect", json={"image": b64, "vocabulary": list(NOVEL_NAMES), "max_detections": 3}).json()
    assert body == form and 0 < len(body["detections"]) <= 3
    assert all("mask" not in d for d in body["detections"])  # masks only when asked for


def test_requests_with_other_settings_in_one_batch_get_their_own_answers(det, pngs):
    images = [decode_image(p) for p in pngs[:4]]
    settings = [(SHOW, 100), (0.05, 100), (SHOW, 2), (SHOW / 5, 5)]
    reqs = [DetectRequest(im, VOCAB, t, m, False) for im, (t, m) in zip(images, settings)]
    batched = DetectorRunner(det)(VOCAB, reqs)
    det.set_vocabulary(VOCAB)
    for im, (t, m), got in zip(images, settings, batched):
        alone = det.predict([im], score_thresh=t, max_dets=m)[0]
        assert len(got) == len(alone) <= m and bool((got.scores >= t).all())
        assert got.names == alone.names
        torch.testing.assert_close(got.boxes, alone.boxes, atol=1e-3, rtol=0)
        torch.testing.assert_close(got.scores, alone.scores, atol=1e-4, rtol=0)
    assert (det.score_thresh, det.max_dets) == (SHOW, 100)  # per-call settings leave the detector's own alone


def test_concurrent_requests_share_a_forward_pass_per_vocabulary(det, pngs, monkeypatch):
    sizes, gate = [], threading.Event()
    predict = det.predict

    def counting(images, *a, **k):
        assert gate.wait(30)
        sizes.append(len(images))
        return predict(images, *a, **k)

    monkeypatch.setattr(det, "predict", counting)
    app = create_app(det, max_batch=4)
    vocabs = {0: "star,heart", 1: "ring,arrow"}
    try:
        with TestClient(app) as c, ThreadPoolExecutor(9) as pool:
            first = pool.submit(upload, c, pngs[0], "circle")  # holds the model while the others queue up
            wait_until(lambda: app.state.batcher.running == 1)
            futures = [pool.submit(upload, c, pngs[i % 6], vocabs[i % 2]) for i in range(8)]
            wait_until(lambda: app.state.batcher.queued == 8)
            gate.set()
            answers = [f.result(30) for f in futures]
            assert first.result(30).status_code == 200
    finally:
        gate.set()
    assert all(r.status_code == 200 for r in answers)
    assert sizes == [1, 4, 4], f"8 queued requests, 2 vocabularies, batches of 4: got passes of {sizes}"
    for i, r in enumerate(answers):
        assert r.json()["vocabulary"] == vocabs[i % 2].split(",")
        assert {d["label"] for d in r.json()["detections"]} <= set(vocabs[i % 2].split(","))


def test_text_embeddings_of_recent_vocabularies_are_cached_and_bounded(pngs, tmp_path):
    d = Detector.from_checkpoint(DEMO, device="cpu", score_thresh=0.3, text_cache_size=2, cache_dir=tmp_path)
    d.teacher.write_cache = False
    files = set(tmp_path.glob("text_*.pt"))  # the training vocabulary's, written by from_checkpoint
    misses = [d.teacher.cache_misses]
    with TestClient(create_app(d)) as c:
        for vocab in ("star", "heart", "star", "ring", "star", "heart"):
            assert upload(c, pngs[0], vocab).status_code == 200
            misses.append(d.teacher.cache_misses)
    # star, heart: encoded; star: cached; ring: encoded (heart leaves); star: cached; heart: encoded again
    assert [b - a for a, b in zip(misses, misses[1:])] == [1, 1, 0, 1, 0, 1]
    assert set(tmp_path.glob("text_*.pt")) == files, "requests choose the names: the server writes no cache files"


@pytest.mark.parametrize("case", ["not_image", "truncated", "empty"])
def test_bad_images_get_400_naming_the_problem(client, pngs, case):
    data = {"not_image": b"GIF89 but really a text file", "truncated": pngs[0][: len(pngs[0]) // 2],
            "empty": b""}[case]
    r = upload(client, data)
    assert r.status_code == 400
    assert {"not_image": "not an image", "truncated": "truncated", "empty": "empty"}[case] in r.json()["detail"]


@pytest.mark.parametrize("image", ["https://example.com/cat.jpg", "/etc/passwd", "file:///etc/hosts"])
def test_urls_and_paths_are_never_fetched_or_read(client, image):
    r = client.post("/detect", json={"image": image, "vocabulary": "cat"})
    assert r.status_code == 400 and "never fetches URLs or reads paths" in r.json()["detail"]


def test_limits_answer_413_or_422_naming_the_limit(det, pngs):
    limits = Limits(max_bytes=len(pngs[0]) + 4096, max_pixels=128 * 128, max_names=3, max_name_chars=10,
                    max_detections=5)
    big = _png(Image.new("RGB", (64, 64)).resize((200, 200)))  # small file, 40000 pixels
    with TestClient(create_app(det, limits)) as c:
        r = upload(c, pngs[0] + b"\0" * 8192)
        assert r.status_code == 413 and f"the limit is {limits.max_bytes} bytes (vild-serve --max-bytes)" in r.text
        chunks = (b"A" * 4096 for _ in range(limits.max_bytes // 4096 + 2))  # streamed: no Content-Length
        r = c.post("/detect", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "--max-bytes" in r.json()["detail"]
        r = upload(c, big, "star")
        assert r.status_code == 413 and "200x200 = 40000 pixels; the limit is 16384 (vild-serve --max-pixels)" in r.json()["detail"]
        r = upload(c, pngs[0], "a,b,c|d")
        assert r.status_code == 422 and "4 names" in r.json()["detail"] and "--max-names" in r.json()["detail"]
        r = upload(c, pngs[0], "star,an enormous star")
        assert r.status_code == 422 and "'an enormous star' has 16 characters; the limit is 10" in r.json()["detail"]
        r = upload(c, pngs[0], "star", max_detections=6)
        assert r.status_code == 422 and "the limit is 5 (vild-serve --max-detections)" in r.json()["detail"]
        assert upload(c, pngs[0], "star,heart,ring", max_detections=5).status_code == 200  # at the limits: fine


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("vocabulary,detail", [(" , ,", "vocabulary is empty"), ("", "vocabulary is empty"),
                                               (None, "vocabulary: Field required")])
def test_empty_or_missing_vocabulary_is_422(client, pngs, vocabulary, detail):
    if vocabulary is None:
        r = client.post("/detect", files={"image": ("a.png", pngs[0], "image/png")})
    else:
        r = upload(client, pngs[0], vocabulary)
    assert r.status_code == 422 and detail in r.json()["detail"]


def test_malformed_requests_are_refused_with_the_fix(client, pngs):
    b64 = base64.b64encode(pngs[0]).decode()
    cases = [
        (dict(json={"vocabulary": "star"}), 422, "image: Field required"),
        (dict(data={"vocabulary": "star"}, files={"other": ("a.png", pngs[0], "image/png")}), 422, "'image'"),
        (dict(json={"image": b64, "vocabulary": "star", "url": "http://x"}), 422, "url: Extra inputs"),
        (dict(json={"image": b64, "vocabulary": "star", "score_threshold": 1.5}), 422, "score_threshold"),
        (dict(json={"image": b64, "vocabulary": ["star", "a,b"]}), 422, "contains a comma"),
        (dict(json={"image": "not base64!", "vocabulary": "star"}), 400, "not valid base64"),
        (dict(json=[1, 2]), 422, "must be an object"),
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(content=pngs[0], headers={"content-type": "image/png"}), 415, "multipart/form-data"),
    ]
    for kwargs, status, detail in cases:
        r = client.post("/detect", **kwargs)
        assert (r.status_code, detail in r.json()["detail"]) == (status, True), (kwargs.keys(), r.text)
    assert upload(client, pngs[0], "star").status_code == 200  # and the server still answers


def test_api_key_is_required_when_set_and_compared_in_constant_time(det, pngs, monkeypatch):
    import hmac
    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with TestClient(create_app(det, api_key="s3cret")) as c:
        assert c.get("/healthz").json()["api_key"] is True  # health and the page stay open
        assert c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}):
            for r in (c.get("/info", headers=headers),
                      c.post("/detect", headers=headers, files={"image": ("a.png", pngs[0], "image/png")},
                             data={"vocabulary": "star"})):
                assert r.status_code == 401 and "API key" in r.json()["detail"]
                assert r.headers["WWW-Authenticate"] == "Bearer"
        assert c.get("/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/detect", headers={"X-API-Key": "s3cret"}, files={"image": ("a.png", pngs[0], "image/png")},
                   data={"vocabulary": "star"})
        assert r.status_code == 200
    assert (b"s3cret", b"s3cret") in calls and len(calls) == 8


def test_full_queue_gets_503_with_retry_after_and_no_request_is_lost(det, pngs, monkeypatch):
    gate, on_model = threading.Event(), threading.Event()
    predict = det.predict

    def slowed(*a, **k):
        on_model.set()
        assert gate.wait(30)
        return predict(*a, **k)

    monkeypatch.setattr(det, "predict", slowed)
    app = create_app(det, max_queue=1)
    try:
        with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
            first = pool.submit(upload, c, pngs[0])
            assert on_model.wait(10)  # the first request is on the (stalled) model
            second = pool.submit(upload, c, pngs[1])
            wait_until(lambda: app.state.batcher.queued == 1)  # the second one waits: the queue is full
            assert c.get("/healthz").json()["queued"] == 1
            r = upload(c, pngs[2])
            assert r.status_code == 503 and "queue is full" in r.json()["detail"]
            assert int(r.headers["Retry-After"]) >= 1
            gate.set()
            assert first.result(30).status_code == 200 and second.result(30).status_code == 200
            assert first.result().json()["detections"] and second.result().json()["detections"]
            assert upload(c, pngs[2]).status_code == 200  # room again
    finally:
        gate.set()


def test_a_stalled_model_times_out_with_503_and_the_abandoned_request_is_dropped(det, pngs, monkeypatch):
    gate = threading.Event()
    predict = det.predict
    monkeypatch.setattr(det, "predict", lambda *a, **k: (gate.wait(30), predict(*a, **k))[1])
    app = create_app(det, max_batch=1, timeout=0.3)
    try:
        with TestClient(app) as c, ThreadPoolExecutor(2) as pool:
            answers = [pool.submit(upload, c, pngs[i]) for i in range(2)]  # one on the model, one waiting
            for f in answers:
                r = f.result(30)
                assert r.status_code == 503 and "--timeout" in r.json()["detail"] and "Retry-After" in r.headers
            gate.set()
            assert upload(c, pngs[2]).status_code == 200
            assert app.state.batcher.items == 2  # the stalled pass and the last one: the waiting job never ran
    finally:
        gate.set()


def test_a_failing_model_gets_500_without_internals_and_the_server_recovers(det, pngs, monkeypatch):
    predict = det.predict

    def broken(*a, **k):
        raise RuntimeError("CUDA error at /home/someone/vild/secret_module.py:42")

    monkeypatch.setattr(det, "predict", broken)
    with TestClient(create_app(det)) as c:
        r = upload(c, pngs[0])
        assert r.status_code == 500 and r.json() == {
            "detail": "detection failed: an internal error (the server's log has the details)"}
        assert "secret" not in r.text and "Traceback" not in r.text
        monkeypatch.setattr(det, "predict", predict)
        assert upload(c, pngs[0]).status_code == 200


def test_page_and_api_docs_are_served_and_the_page_loads_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200 and "<canvas" in r.text
    assert r.headers["content-security-policy"].startswith("default-src 'self'")
    for path in ("/", "/static/app.js", "/static/style.css"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, path
    assert "/detect" in client.get("/openapi.json").json()["paths"]
    info = client.get("/info").json()
    assert info["limits"] == Limits().as_dict() and info["variant"] == "vild"
    assert json.loads(json.dumps(info))["training_vocabulary"][0] == "circle"


def test_vild_serve_binds_loopback_by_default_and_takes_the_key_from_the_environment(monkeypatch, capsys, tmp_path):
    import uvicorn

    from vild.cli.serve import main as serve
    runs = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: runs.append((app, kw)))
    monkeypatch.setenv("VILD_API_KEY", "from-env")
    assert serve(["--weights", str(tmp_path / "none.pth")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert serve(["--weights", str(DEMO), "--device", "cpu", "--max-names", "7"]) == 0
    app, kw = runs[-1]
    assert (kw["host"], kw["port"]) == ("127.0.0.1", 8000) and "warning" not in capsys.readouterr().err
    with TestClient(app) as c:
        assert c.get("/info").status_code == 401
        info = c.get("/info", headers={"Authorization": "Bearer from-env"}).json()
    assert info["limits"]["max_names"] == 7
    assert info["score_threshold"] == load_checkpoint(DEMO)["calibration"]["score_thresh"]  # the calibrated one
    assert app.state.detector.teacher.write_cache is False
    monkeypatch.delenv("VILD_API_KEY")
    assert serve(["--weights", str(DEMO), "--device", "cpu", "--host", "0.0.0.0"]) == 0
    assert runs[-1][1]["host"] == "0.0.0.0" and "without an API key" in capsys.readouterr().err
