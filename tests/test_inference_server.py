"""HTTP server: /health, /search (JSON text or upload), /vqa, 4xx JSON errors, micro-batching."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from inference_fixtures import *

from mmfm.inference.server import create_app


@pytest.fixture(scope="module")
def client(tiny_pipe, image_index):
    with TestClient(create_app(tiny_pipe, image_index, max_upload_mb=0.05, batch_wait_ms=5)) as client:
        yield client


def _upload(path, field="image", name=None):
    return {field: (name or path.name if hasattr(path, "name") else str(path), open(path, "rb"))}


def test_health(client, image_index):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["index"] == {"modality": "image", "size": len(image_index)}


def test_search_text_matches_the_api(client, image_index, gallery):
    caption = gallery[1][4]
    response = client.post("/search", json={"text": caption, "k": 3, "rerank": 5})
    assert response.status_code == 200
    expected = image_index.search(text=caption, k=3, rerank=5)
    assert [h["id"] for h in response.json()["hits"]] == [h.id for h in expected]
    assert response.json()["hits"][0]["itm"] == pytest.approx(expected[0].itm, abs=1e-4)


def test_search_by_image_upload(client, tiny_pipe, gallery):
    from pathlib import Path

    path = Path(gallery[0][5])
    response = client.post("/search", files=_upload(path), data={"k": "2"})
    assert response.status_code == 200
    assert response.json()["hits"][0]["id"] == str(path)


def test_vqa_image_and_video(client, tiny_pipe, gallery, videos):
    from pathlib import Path

    image = Path(gallery[0][0])
    response = client.post("/vqa", files=_upload(image), data={"question": "is there a red circle?", "topk": "3"})
    assert response.status_code == 200
    expected = tiny_pipe.answer(image, "is there a red circle?", topk=3)
    assert [a["answer"] for a in response.json()["answers"]] == [a for a, _ in expected]
    video = Path(videos[0])
    response = client.post("/vqa", files=_upload(video, "file"), data={"question": "where does it move?"})
    assert response.status_code == 200
    assert all(a["answer"] in tiny_pipe.model.answers["video_qa"] for a in response.json()["answers"])


@pytest.mark.parametrize("case,status,match", [
    ("not_image", 400, "not_image.png"),
    ("bad_video", 400, "broken.mp4"),
    ("bomb", 400, "decompression bomb"),
    ("empty_question", 400, "question"),
    ("oversized", 413, "exceeds the server limit"),
    ("oversized_chunked", 413, "exceeds the server limit"),
    ("no_file", 400, "upload exactly one file"),
    ("bad_json", 400, "not valid JSON"),
    ("empty_text", 400, "'text' is missing or empty"),
    ("bad_k", 400, "'k'"),
])
def test_bad_input_is_a_4xx_json_error(client, bad_inputs, gallery, tmp_path, case, status, match):
    question = {"question": "what is it?"}
    if case in ("not_image", "bomb"):
        response = client.post("/vqa", files=_upload(bad_inputs[case]), data=question)
    elif case == "bad_video":
        response = client.post("/vqa", files=_upload(bad_inputs[case], "video"), data=question)
    elif case == "empty_question":
        from pathlib import Path

        response = client.post("/vqa", files=_upload(Path(gallery[0][0])), data={"question": " "})
    elif case == "oversized":
        big = tmp_path / "big.png"
        big.write_bytes(b"\0" * 100_000)
        response = client.post("/vqa", files=_upload(big), data=question)
    elif case == "oversized_chunked":
        response = client.post("/search", content=iter([b'{"text": "', b"a" * 100_000, b'"}']),
                               headers={"content-type": "application/json"})
    elif case == "no_file":
        response = client.post("/vqa", data=question)
    elif case == "bad_json":
        response = client.post("/search", content=b"{not json", headers={"content-type": "application/json"})
    elif case == "empty_text":
        response = client.post("/search", json={"text": ""})
    else:
        response = client.post("/search", json={"text": "a red circle", "k": "many"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert match in error["message"] and error["type"] in ("InputError", "UploadTooLarge")


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(tiny_pipe, image_index, gallery):
    app = create_app(tiny_pipe, image_index, batch_wait_ms=300)
    captions = gallery[1][:6]
    with TestClient(app) as client, ThreadPoolExecutor(len(captions)) as pool:
        responses = list(pool.map(lambda c: client.post("/search", json={"text": c, "k": 3}), captions))
    assert max(app.state.batcher.batch_sizes) > 1
    for caption, response in zip(captions, responses):
        expected = image_index.search(text=caption, k=3)
        assert [h["id"] for h in response.json()["hits"]] == [h.id for h in expected]
        assert [h["score"] for h in response.json()["hits"]] == pytest.approx([h.score for h in expected], abs=1e-4)


def test_concurrent_vqa_is_batched(tiny_pipe, image_index, gallery):
    from pathlib import Path

    app = create_app(tiny_pipe, image_index, batch_wait_ms=300)
    pairs = [(Path(p), q) for p, q in zip(gallery[0][:4], ["is it red?", "how many?", "what shape?", "is it big?"])]

    def ask(pair):
        return client.post("/vqa", files=_upload(pair[0]), data={"question": pair[1], "topk": "2"}).json()

    with TestClient(app) as client, ThreadPoolExecutor(len(pairs)) as pool:
        responses = list(pool.map(ask, pairs))
    assert max(app.state.batcher.batch_sizes) > 1
    for (path, question), response in zip(pairs, responses):
        expected = tiny_pipe.answer(path, question, topk=2)
        assert [a["answer"] for a in response["answers"]] == [a for a, _ in expected]
