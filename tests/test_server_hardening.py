"""HTTP server hardening: strict integer fields, hostile JSON, the framework's own errors in the documented
body, the OpenAPI description of bodies and errors, and memory that does not grow with distinct texts."""

import gc
import tracemalloc

import pytest
from fastapi.testclient import TestClient
from inference_fixtures import *

from mmfm.inference.server import create_app

# str.isdigit() accepts all but the last two; int() rejects all but "٣" (an Arabic-Indic 3) and "+5".
BAD_INTEGERS = ["²", "①", "٣", "--5", "+-3", "5-", "1_000", "0x10", "9" * 5000, "+5 5", 3.0, True, [5]]


@pytest.fixture(scope="module")
def client(tiny_pipe, image_index):
    with TestClient(create_app(tiny_pipe, image_index, max_upload_mb=0.05), raise_server_exceptions=False) as client:
        yield client


def _error(response, status: int) -> dict:
    """The documented error body of ``response``, after checking its status and content type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and error["message"]
    return error


def _png(gallery) -> tuple:
    with open(gallery[0][0], "rb") as file:
        return ("q.png", file.read(), "image/png")


@pytest.mark.parametrize("value", BAD_INTEGERS, ids=lambda value: repr(value)[:12])
def test_malformed_integer_in_json_is_a_400(client, value):
    error = _error(client.post("/search", json={"text": "a red circle", "k": value}), 400)
    assert error["type"] == "InputError" and "'k'" in error["message"] and "from 1 to 10000" in error["message"]
    assert len(error["message"]) < 200  # a 5000-digit value is shown shortened


@pytest.mark.parametrize("field,value", [("topk", "²"), ("topk", "①"), ("topk", "--5"), ("topk", "9" * 5000),
                                         ("topk", "0"), ("topk", "10001")])
def test_malformed_integer_in_a_form_is_a_400(client, gallery, field, value):
    response = client.post("/vqa", files={"image": _png(gallery)}, data={"question": "is it red?", field: value})
    assert f"'{field}'" in _error(response, 400)["message"]


def test_malformed_k_of_an_upload_search_is_a_400(client, gallery):
    response = client.post("/search", files={"image": _png(gallery)}, data={"k": "①"})
    assert "'k'" in _error(response, 400)["message"]


def test_signed_and_padded_integers_still_parse(client):
    response = client.post("/search", json={"text": "a red circle", "k": " +2 ", "rerank": "-0"})
    assert response.status_code == 200, response.text
    assert len(response.json()["hits"]) == 2


def test_json_number_past_the_int_digit_limit_is_a_400(client):
    body = b'{"text": "a red circle", "k": ' + b"9" * 5000 + b"}"
    error = _error(client.post("/search", content=body, headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"] and "too long" in error["message"]


def test_deeply_nested_json_is_a_400(client):
    body = b"[" * 20_000 + b"]" * 20_000
    error = _error(client.post("/search", content=body, headers={"content-type": "application/json"}), 400)
    assert "nested too deeply" in error["message"]


def test_unknown_route_is_a_404_with_the_error_body(client):
    error = _error(client.get("/no/such/route"), 404)
    assert error["type"] == "NotFound" and "GET /no/such/route" in error["message"] and "/search" in error["message"]


def test_wrong_method_is_a_405_with_the_error_body(client):
    response = client.get("/vqa")
    error = _error(response, 405)
    assert error["type"] == "MethodNotAllowed" and "use POST" in error["message"]
    assert response.headers["allow"] == "POST"


def test_malformed_multipart_is_a_400_with_the_error_body(client):
    response = client.post("/vqa", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert "boundary" in _error(response, 400)["message"]


@pytest.mark.parametrize("declared,status", [(b"9" * 5000, 413), ("²".encode(), 400), (b"12abc", 400), (b"-1", 400)])
def test_malformed_content_length_is_a_4xx(client, declared, status):
    response = client.post("/search", content=b'{"text": "a"}',
                           headers={"content-type": "application/json", "content-length": declared})
    _error(response, status)


def test_framework_validation_and_unexpected_errors_keep_the_error_body(tiny_pipe, image_index):
    app = create_app(tiny_pipe, image_index)

    @app.get("/typed")
    async def typed(n: int):
        return {"n": n}

    @app.get("/broken")
    async def broken():
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert "query.n" in _error(client.get("/typed", params={"n": "①"}), 400)["message"]
        error = _error(client.get("/broken"), 500)
    assert error["type"] == "InternalError" and "secret" not in error["message"]


def test_openapi_declares_request_bodies_and_error_responses(client):
    doc = client.get("/openapi.json").json()
    search, vqa = doc["paths"]["/search"]["post"], doc["paths"]["/vqa"]["post"]
    search_body = search["requestBody"]["content"]
    assert set(search_body["application/json"]["schema"]["properties"]) == {"text", "k", "rerank"}
    assert {"image", "video", "file", "k", "rerank"} <= set(search_body["multipart/form-data"]["schema"]["properties"])
    vqa_form = vqa["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "question", "topk"} <= set(vqa_form["properties"]) and vqa_form["required"] == ["question"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for operation in (search, vqa):
        for status in ("400", "405", "413"):
            assert operation["responses"][status]["content"]["application/json"]["schema"] == error_ref
    assert doc["paths"]["/health"]["get"]["responses"]["405"]["content"]["application/json"]["schema"] == error_ref
    assert set(doc["components"]["schemas"]["ErrorBody"]["properties"]) == {"error"}


def test_distinct_long_texts_do_not_grow_server_memory(tiny_pipe, image_index):
    """Issue #17: every distinct query text used to be kept whole by a text-keyed cache (100 KB each)."""

    def long_text(i: int) -> str:
        return f"query {i}: " + "a red circle left of a blue square " * 3000  # ~100 KB, cheap to tokenise

    with TestClient(create_app(tiny_pipe, image_index)) as client:
        for i in range(2):  # first-request allocations happen before the baseline
            assert client.post("/search", json={"text": long_text(-1 - i), "k": 2}).status_code == 200
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for i in range(24):
                assert client.post("/search", json={"text": long_text(i), "k": 2}).status_code == 200
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    assert grown < 1_000_000, f"{grown / 1e6:.1f} MB kept after 24 distinct 100 KB texts (2.4 MB of text)"
