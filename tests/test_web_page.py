"""The web page of `mmfm serve`: its routes (TestClient) and the page itself in headless Chromium (selenium).

The zoo model mmfm-shapes-s indexes a gallery of ShapesWorld scenes drawn for the test, each with known
objects, so the top hit of a caption and the answer to a counting or colour question are known.
Set MMFM_SCREENSHOT=docs/images/web_page.png to refresh the screenshot in docs/inference.md.
"""

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mmfm.data.shapes import SIZES, render_image, render_video
from mmfm.data.video import write_mp4
from mmfm.inference.server import create_app
from mmfm.inference.web import STRIP_FRAMES, STRIP_GAP, THUMB_SIZE, endpoints

MODEL = "mmfm-shapes-s"
SIDE = 64
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
# (file name, objects as (colour, shape, cell of the 3x3 layout, size)); no pair is a held-out one.
SCENES = [
    ("red_circle", [("red", "circle", 4, "large")]),
    ("blue_square", [("blue", "square", 4, "large")]),
    ("green_triangle", [("green", "triangle", 4, "large")]),
    ("yellow_star", [("yellow", "star", 4, "large")]),
    ("white_cross", [("white", "cross", 4, "large")]),
    ("purple_diamond", [("purple", "diamond", 4, "large")]),
    ("two_objects", [("gray", "circle", 3, "large"), ("green", "square", 5, "large")]),
    ("three_objects", [("purple", "diamond", 0, "large"), ("orange", "cross", 4, "large"),
                       ("white", "square", 8, "large")]),
    ("four_objects", [("red", "square", 0, "small"), ("blue", "circle", 2, "small"),
                      ("yellow", "triangle", 6, "small"), ("green", "star", 8, "small")]),
]


def _objects(spec: list[tuple]) -> list[dict]:
    objects = []
    for color, shape, cell, size in spec:
        row, col = divmod(cell, 3)
        center = [(col + 0.5) * SIDE / 3, (row + 0.5) * SIDE / 3]
        objects.append({"shape": shape, "color": color, "size": size, "row": row, "col": col,
                        "center": center, "radius": SIZES[size] * SIDE / 2})
    return objects


@pytest.fixture(scope="module")
def pipe():
    import mmfm

    return mmfm.load(MODEL, device="cpu")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    """name -> PNG of each scene of SCENES."""
    root = tmp_path_factory.mktemp("web_gallery")
    paths = {}
    for seed, (name, spec) in enumerate(SCENES):
        image, _ = render_image({"size": SIDE, "objects": _objects(spec)}, np.random.default_rng(seed))
        paths[name] = root / f"{name}.png"
        image.save(paths[name])
    return paths


@pytest.fixture(scope="module")
def index(pipe, scenes):
    return pipe.index(images=[str(path) for path in scenes.values()], progress=False)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    from inference_fixtures import write_bad_inputs

    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.fixture(scope="module")
def client(pipe, index):
    with TestClient(create_app(pipe, index)) as client:
        yield client


# ---- routes -------------------------------------------------------------------------------------

def test_page_and_its_files_are_served_with_their_content_types(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    script, style = client.get("/static/app.js"), client.get("/static/style.css")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "async function search" in script.text
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    missing = client.get("/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFound"


def test_search_hits_give_their_gallery_position(client, index):
    hits = client.post("/search", json={"text": "a red circle", "k": 3}).json()["hits"]
    assert [hit["position"] for hit in hits] == [index.ids.index(hit["id"]) for hit in hits]
    assert hits[0]["id"].endswith("red_circle.png")


def test_thumbnail_is_a_small_jpeg_with_caching_headers(client, scenes):
    response = client.get("/thumb/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"] and response.headers["etag"].startswith('"')
    thumb = Image.open(BytesIO(response.content))
    assert thumb.format == "JPEG" and thumb.size == (SIDE, SIDE)  # fitted in THUMB_SIZE, never enlarged
    pixels = np.asarray(thumb, np.int16)[SIDE // 2 - 4:SIDE // 2 + 4, SIDE // 2 - 4:SIDE // 2 + 4]
    assert np.abs(pixels - (220, 40, 40)).max() < 40  # the red circle in the centre of item 0
    etag = response.headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}'):
        again = client.get("/thumb/0", headers={"If-None-Match": header})
        assert again.status_code == 304 and not again.content and again.headers["etag"] == etag
    assert client.get("/thumb/1", headers={"If-None-Match": etag}).status_code == 200


def test_thumbnail_of_a_large_image_is_resized(pipe, tmp_path, write_png):
    big = write_png(tmp_path / "big.png", size=(500, 250))
    with TestClient(create_app(pipe, pipe.index(images=[big], progress=False))) as client:
        thumb = Image.open(BytesIO(client.get("/thumb/0").content))
    assert thumb.size == (THUMB_SIZE, THUMB_SIZE // 2)


@pytest.mark.parametrize("route", ["thumb", "item"])
@pytest.mark.parametrize("position", ["9", "10", "-1", "abc", "1.0", "²", "0x1", " 1", "9" * 40])
def test_a_bad_gallery_position_is_a_json_404(client, route, position):
    response = client.get(f"/{route}/{position}")
    assert response.status_code == 404 and response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == "ItemNotFound" and "positions are 0 to 8" in error["message"]


@pytest.mark.parametrize("path", ["/thumb/..%2F..%2F..%2Fetc%2Fpasswd", "/item/%2Fetc%2Fpasswd",
                                  "/item/../../etc/passwd", "/static/..%2F..%2Fserver.py"])
def test_no_path_reaches_a_file_outside_the_gallery(client, path):
    response = client.get(path)
    assert response.status_code == 404 and response.json()["error"]["type"] == "NotFound"


def test_an_item_whose_file_is_gone_is_a_404(pipe, tmp_path, write_png):
    path = write_png(tmp_path / "gone.png")
    app = create_app(pipe, pipe.index(images=[path], progress=False))
    os.unlink(path)
    with TestClient(app) as client:
        error = client.get("/thumb/0").json()["error"]
    assert error["type"] == "ItemNotFound" and "gone.png" in error["message"]


def test_thumbnails_are_decoded_within_the_decode_budget(pipe, index):
    with TestClient(create_app(pipe, index, max_decode_pixels=SIDE * SIDE - 1)) as client:
        response = client.get("/thumb/0")
    assert response.status_code == 400 and "--max-decode-pixels" in response.json()["error"]["message"]


def test_an_unknown_route_names_the_page_routes(client):
    message = client.get("/nowhere").json()["error"]["message"]
    assert "GET /model" in message and "GET /thumb/{position}" in message and "POST /search" in message


def test_item_is_the_gallery_file_itself(client, scenes):
    response = client.get("/item/1")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.content == scenes["blue_square"].read_bytes()


def test_video_thumbnail_is_a_strip_of_frames(pipe, tmp_path):
    objects = [{"shape": "square", "color": "blue", "size": "large", "radius": SIZES["large"] * SIDE / 2,
                "motion": "right", "start": [14.0, 32.0], "end": [50.0, 32.0], "event": None}]
    frames = render_video({"size": SIDE, "frames": 8, "objects": objects}, np.random.default_rng(0))
    write_mp4(tmp_path / "moving.mp4", frames)
    with TestClient(create_app(pipe, pipe.index(videos=[str(tmp_path / "moving.mp4")], progress=False))) as client:
        response = client.get("/thumb/0")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    strip = np.asarray(Image.open(BytesIO(response.content)).convert("RGB"), np.int16)
    assert strip.shape == (SIDE, STRIP_FRAMES * SIDE + (STRIP_FRAMES - 1) * STRIP_GAP, 3)
    blue = np.abs(strip - (60, 110, 255)).sum(axis=2) < 90
    starts = [i * (SIDE + STRIP_GAP) for i in range(STRIP_FRAMES)]
    lefts = [np.flatnonzero(blue[:, start:start + SIDE].any(axis=0))[0] for start in starts]
    assert lefts == sorted(lefts) and lefts[-1] - lefts[0] > SIDE // 3  # the square moves right


def test_model_card_shows_the_zoo_entry_and_the_index(client):
    from mmfm.zoo import find_entry

    card = client.get("/model").json()
    entry = find_entry(MODEL)
    assert card["name"] == MODEL and card["image_size"] == SIDE
    assert card["zoo"]["description"] == entry.description and card["zoo"]["metrics"] == entry.metrics
    assert card["index"] == {"modality": "image", "size": len(SCENES)}
    assert card["answers"]["vqa"] > 0
    assert {"POST /search", "POST /vqa", "GET /thumb/{position}"} <= set(card["endpoints"])


def test_model_card_of_a_local_checkpoint_has_no_zoo_entry(pipe):
    from mmfm.inference.pipeline import Pipeline

    with TestClient(create_app(Pipeline(pipe.model, "cpu", name="runs/mine/model.safetensors"))) as client:
        card = client.get("/model").json()
        error = client.get("/thumb/0").json()["error"]
    assert card["name"] == "runs/mine/model.safetensors" and card["zoo"] is None and card["index"] is None
    assert "no index" in error["message"]


# ---- the page in a real browser -----------------------------------------------------------------

@contextmanager
def serving(app):
    """Run ``app`` with uvicorn on a free port of 127.0.0.1 in a thread; yields the page's URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium not installed: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=f"waiting for {what}")


def _by_id(driver, element_id):
    return driver.find_element("id", element_id)


def _search(driver, text: str, rerank: bool = False) -> list:
    query = _by_id(driver, "query")
    query.clear()
    query.send_keys(text)
    if _by_id(driver, "rerank").is_selected() != rerank:
        _by_id(driver, "rerank").click()
    driver.execute_script("document.getElementById('results').replaceChildren()")
    _by_id(driver, "search-button").click()
    return _wait(driver, lambda d: d.find_elements("css selector", "#results .hit"), f"hits for {text!r}")


def _submit(driver, field_id: str, text: str, button_id: str, results_id: str) -> list[str]:
    """Type ``text`` in a field, press the button; the labels of the bars it shows."""
    driver.execute_script(f"document.getElementById('{results_id}').replaceChildren()")
    field = _by_id(driver, field_id)
    field.clear()
    field.send_keys(text)
    _by_id(driver, button_id).click()
    rows = _wait(driver, lambda d: d.find_elements("css selector", f"#{results_id} .answer-label"), results_id)
    return [row.text for row in rows]


def _ask(driver, question: str) -> list[str]:
    return _submit(driver, "question", question, "ask-button", "answers")


def _visible_error(driver, element_id: str) -> str:
    return _wait(driver, lambda d: _by_id(d, element_id).is_displayed() and _by_id(d, element_id).text,
                 f"the error message in #{element_id}")


def test_the_page_searches_answers_and_shows_errors(browser, pipe, index, scenes, bad_inputs, tmp_path):
    too_large = tmp_path / "too_large.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), np.uint8)).save(too_large)
    app = create_app(pipe, index, max_upload_mb=0.1)
    with serving(app) as url:
        browser.get(url)
        card = _wait(browser, lambda d: MODEL in _by_id(d, "model-card").text, "the model card")
        assert card and "img_r1" in _by_id(browser, "model-card").text
        assert f"{len(SCENES)} images indexed" in _by_id(browser, "server-status").text

        hits = _search(browser, "a red circle")
        assert len(hits) == len(SCENES) and hits[0].get_attribute("data-id") == str(scenes["red_circle"])
        first = hits[0].find_element("css selector", "img")
        assert _wait(browser, lambda d: d.execute_script("return arguments[0].naturalWidth", first), "a thumbnail")

        hits = _search(browser, "a blue square", rerank=True)
        assert hits[0].get_attribute("data-id") == str(scenes["blue_square"])
        assert "itm" in hits[0].text and "re-ranked" in _by_id(browser, "search-summary").text

        hits = _search(browser, "a purple diamond, an orange cross and a white square")
        assert hits[0].get_attribute("data-id") == str(scenes["three_objects"])
        hits[0].find_element("css selector", "button").click()  # pick it for the question
        _wait(browser, lambda d: _by_id(d, "ask-name").text == "three_objects.png", "the picked item")
        assert _ask(browser, "how many objects are there?")[0] == "3"

        _by_id(browser, "ask-file").send_keys(str(scenes["red_circle"]))
        assert _ask(browser, "what color is the circle?")[0] == "red"
        bars = browser.find_elements("css selector", "#answers .bar")
        assert float(bars[0].value_of_css_property("width")[:-2]) > float(bars[1].value_of_css_property("width")[:-2])
        if "POST /classify" in endpoints(app):
            labels = _submit(browser, "labels", "blue square, red circle, green triangle", "classify-button",
                             "label-scores")
            assert labels[0] == "red circle"
        else:
            assert not _by_id(browser, "classify-panel").is_displayed()
        if os.environ.get("MMFM_SCREENSHOT"):
            browser.set_window_size(1280, 1100)
            _search(browser, "a blue square", rerank=True)
            browser.save_screenshot(os.environ["MMFM_SCREENSHOT"])

        query = _by_id(browser, "query")
        query.clear()
        _by_id(browser, "search-button").click()
        assert "'text' is missing or empty" in _visible_error(browser, "search-error")
        assert not browser.find_elements("css selector", "#results .hit")

        _by_id(browser, "ask-file").send_keys(str(bad_inputs["not_image"]))
        _by_id(browser, "ask-button").click()
        message = _visible_error(browser, "ask-error")
        assert "not_image.png" in message and "400 InputError" in message

        _by_id(browser, "ask-file").send_keys(str(too_large))
        _by_id(browser, "ask-button").click()
        _wait(browser, lambda d: "413 UploadTooLarge" in _by_id(d, "ask-error").text, "the upload limit error")
        assert "exceeds the server limit" in _by_id(browser, "ask-error").text

    _by_id(browser, "query").send_keys("a red circle")  # the server is gone now
    _by_id(browser, "search-button").click()
    _wait(browser, lambda d: "cannot reach the server" in _by_id(d, "search-error").text, "the network error")
