"""Bounded work per request (issue 19, findings 1, 2, 8, 9 and 13): what a request may cost is
capped before the work is done, and what an error echoes back is short."""

import json
import threading

import httpx
import pytest

from tests.conftest import wait_ingested

MAX_REPLY = 64 * 1024


def _error(response: httpx.Response, status: int, type_: str | None = None) -> dict:
    assert response.status_code == status, response.text[:500]
    assert len(response.content) <= MAX_REPLY
    body = response.json()
    assert set(body) == {"detail", "type", "request_id"} and body["request_id"] == response.headers["x-request-id"]
    if type_ is not None:
        assert body["type"] == type_
    return body


# --- finding 1: request bodies and error replies ------------------------------------------------


def test_an_oversized_batch_is_refused_before_its_documents_are_validated(client):
    """The probe: 1 MB of 40,000 invalid documents drew an 11.5 MB reply listing every error."""
    body = json.dumps({"documents": [{"id": "bad id!", "text": ""}] * 40_000}).encode()
    assert 1_000_000 < len(body) < 2_000_000
    response = client.post("/documents", content=body, headers={"content-type": "application/json"})
    assert "40000 documents exceeds the limit of 64" in _error(response, 413, "too_large")["detail"]


def test_a_body_over_the_limit_is_refused_before_it_is_read(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), max_body_bytes=100_000)
    doc = {"documents": [{"id": "big", "text": "x" * 200_000}]}
    declared = client.post("/documents", json=doc)  # Content-Length says it all
    assert "exceeds the limit of 100000" in _error(declared, 413, "too_large")["detail"]

    def chunks():  # no Content-Length: counted as it streams in
        data = json.dumps(doc).encode()
        for start in range(0, len(data), 16_384):
            yield data[start : start + 16_384]

    streamed = client.post("/documents", content=chunks(), headers={"content-type": "application/json"})
    _error(streamed, 413, "too_large")
    assert client.get("/documents/big").status_code == 404


def test_validation_errors_echo_only_a_short_prefix_of_each_input(client):
    docs = [{"id": "bad id " + "y" * 20_000, "text": "z" * 20_000, "published_at": "not a date at all"}] * 60
    response = client.post("/documents", json={"documents": docs})
    body = _error(response, 422, "validation_error")
    assert len(body["detail"]) == 21 and body["detail"][-1]["type"] == "truncated"  # 20 errors and how many more
    assert all(len(json.dumps(e.get("input", ""))) < 100 for e in body["detail"])


# --- findings 8 and 9: strict JSON in and out ---------------------------------------------------------


@pytest.mark.parametrize("raw", [b'{"question":"x","top_k":NaN}', b'{"question":"x","top_k":Infinity}',
                                 b'{"documents":[{"id":"a","text":"t","title":-Infinity}]}'])
def test_nan_is_not_json_and_never_comes_back(client, raw):
    path = "/ask" if b"question" in raw else "/documents"
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    _error(response, 422, "validation_error")
    json.loads(response.text, parse_constant=lambda c: pytest.fail(f"bare {c} in the reply"))


@pytest.mark.parametrize("raw", [b'{"documents": "\xff\xfe"}', b'{"question": "caf\xe9?"}', b"\xff\xfe{\x00}\x00"])
def test_a_body_that_is_not_utf8_is_a_422(client, raw):
    path = "/ask" if b"question" in raw else "/documents"
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert "UTF-8" in json.dumps(_error(response, 422, "validation_error")["detail"])


# --- finding 2: bounded work per answer ------------------------------------------------------------


@pytest.mark.parametrize("field, value, limit", [("top_k", 20, 10), ("max_new_tokens", 512, 32)])
def test_top_k_and_max_new_tokens_have_caps(client, field, value, limit):
    response = client.post("/ask", json={"question": "Who approved the bridge?", field: value})
    assert f"exceeds the limit of {limit}" in _error(response, 422, "validation_error")["detail"]
    assert client.post("/ask", json={"question": "Who approved the bridge?", field: limit}).status_code == 200


@pytest.mark.parametrize("question", ["漢字" * 1000, "🙂" * 1500])
def test_a_question_is_capped_in_tokens_not_only_characters(client, question):
    """The probe: 2,000 CJK or emoji characters (within the character limit) took 67-82 s to answer."""
    assert len(question) <= 2000
    response = client.post("/ask", json={"question": question, "max_new_tokens": 2})
    assert "tokens exceeds the limit of 256" in _error(response, 413, "too_large")["detail"]


def test_a_long_document_without_spaces_cannot_blow_up_the_prompt(make_server, tiny_model_dir):
    """The probe: an accepted 100,000-character document without spaces became a 60,066-token prompt."""
    server = make_server(base_model=str(tiny_model_dir), max_prompt_tokens=300)
    client = server.client
    text = "harbourbridge " + "x" * 99_986
    assert client.post("/documents", json={"documents": [{"id": "wall", "text": text}]}).status_code == 202
    wait_ingested(client, ["wall"])
    fed = []
    model = server.app.state.runtime.model
    hook = model.register_forward_pre_hook(lambda m, args, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        body = client.post("/ask", json={"question": "harbourbridge?", "strategy": "rag", "max_new_tokens": 4}).json()
    finally:
        hook.remove()
    assert body["strategy"] == "rag" and body["documents"][0]["id"] == "wall"
    assert all(len(d["passage"]) <= 2000 for d in body["documents"])  # FRESHLM_RAG_PASSAGE_CHARS
    assert fed and fed[0] <= 300  # the prompt, cut to FRESHLM_MAX_PROMPT_TOKENS


def test_generation_ends_at_the_deadline_with_a_504(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), ask_deadline_seconds=1e-6)
    response = client.post("/ask", json={"question": "Who approved the bridge?", "max_new_tokens": 32})
    assert "deadline" in _error(response, 504, "deadline_exceeded")["detail"]


def test_a_question_that_waits_past_its_deadline_for_the_model_is_a_503(make_server, tiny_model_dir):
    server = make_server(base_model=str(tiny_model_dir), ask_deadline_seconds=0.5)
    lock = server.app.state.answerer.adapters.lock  # what a running answer holds
    acquired, release = threading.Event(), threading.Event()

    def hold():
        with lock:
            acquired.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        acquired.wait(10)
        response = server.client.post("/ask", json={"question": "Who approved the bridge?", "max_new_tokens": 2})
    finally:
        release.set()
        holder.join()
    assert "busy" in _error(response, 503, "unavailable")["detail"] and response.headers["retry-after"]


# --- finding 13: what a document may be -----------------------------------------------------------------


@pytest.mark.parametrize("doc, needle", [
    ({"id": "d", "text": "News.", "published_at": "not a date at all"}, "ISO-8601"),
    ({"id": "d", "text": "\u200b\u200b\u200b"}, "invisible"),
    ({"id": "d", "text": "\u200b \ufeff\u2060\n"}, "invisible"),
])
def test_dates_must_be_dates_and_text_must_be_visible(client, doc, needle):
    assert needle in json.dumps(_error(client.post("/documents", json={"documents": [doc]}), 422)["detail"])


def test_valid_dates_are_accepted(client):
    docs = [{"id": f"d{i}", "text": "News.", "published_at": d} for i, d in
            enumerate(["2031-03-04", "2031-03-04T09:30:00", "2031-03-04T09:30:00+02:00", "2031-03-04T09:30:00Z"])]
    assert client.post("/documents", json={"documents": docs}).status_code == 202


def test_a_question_of_invisible_characters_is_refused(client):
    _error(client.post("/ask", json={"question": "\u200b\u200c\u200d"}), 422, "validation_error")


def test_an_explicit_rag_request_that_retrieved_nothing_is_not_reported_as_rag(client):
    client.post("/documents", json={"documents": [{"id": "n-1", "text": "The council approved the bridge."}]})
    wait_ingested(client, ["n-1"])
    body = client.post("/ask", json={"question": "zzz qqq?", "strategy": "rag", "max_new_tokens": 2}).json()
    assert body["strategy"] == "none" and body["documents"] == []
    found = client.post("/ask", json={"question": "Who approved the bridge?", "strategy": "rag", "max_new_tokens": 2})
    assert found.json()["strategy"] == "rag"
