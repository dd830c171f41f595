"""The HTTP API through a real client over loopback, with a tiny model, real Redis and SQLite."""

import pytest

DOC = {"id": "n-1", "title": "Bridge", "text": "The council approved the harbour bridge on Tuesday."}


def test_healthz_pings_database_and_redis(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_ingest_then_read_back(client):
    response = client.post("/documents", json={"documents": [DOC]})
    assert response.status_code == 202
    (status,) = response.json()["documents"]
    assert status["id"] == "n-1" and status["status"] == "ingested"
    stored = client.get(status["status_url"]).json()
    assert stored["text"] == DOC["text"] and stored["title"] == "Bridge"


def test_documents_persist_across_restarts(make_client, tiny_model_dir, tmp_path):
    first = make_client(base_model=str(tiny_model_dir), data_dir=tmp_path / "persist")
    assert first.post("/documents", json={"documents": [DOC]}).status_code == 202
    second = make_client(base_model=str(tiny_model_dir), data_dir=tmp_path / "persist")
    assert second.get("/documents/n-1").json()["text"] == DOC["text"]


def test_same_content_is_a_no_op_and_different_content_conflicts(client):
    client.post("/documents", json={"documents": [DOC]})
    again = client.post("/documents", json={"documents": [DOC]})
    assert again.status_code == 202 and again.json()["documents"][0]["status"] == "unchanged"
    changed = client.post("/documents", json={"documents": [{**DOC, "text": "Something else."}]})
    assert changed.status_code == 409 and "n-1" in changed.json()["detail"]


def test_conflicting_batch_writes_nothing(client):
    batch = [{"id": "fresh", "text": "new"}, {"id": "dup", "text": "one"}, {"id": "dup", "text": "two"}]
    assert client.post("/documents", json={"documents": batch}).status_code == 409
    assert client.get("/documents/fresh").status_code == 404


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"documents": [{"id": "x", "text": "   "}]}, "must not be empty"),
        ({"documents": [{"id": "x", "text": ""}]}, "at least 1 character"),
        ({"documents": [{"text": "no id"}]}, "Field required"),
        ({"documents": [{"id": "x"}]}, "Field required"),
        ({"documents": []}, "at least 1 item"),
        ({"documents": [{"id": "bad id/with slash", "text": "t"}]}, "should match pattern"),
        ({"documents": [{"id": "x", "text": "t", "unknown": 1}]}, "Extra inputs are not permitted"),
        ({}, "Field required"),
    ],
)
def test_bad_documents_get_422_with_a_message(client, body, needle):
    response = client.post("/documents", json=body)
    assert response.status_code == 422
    assert needle in response.text


def test_malformed_json_is_a_4xx(client):
    response = client.post("/documents", content=b'{"documents": [', headers={"content-type": "application/json"})
    assert response.status_code == 422 and "JSON" in response.text
    response = client.post("/documents", content=b'{"documents": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_oversized_batch_and_text_get_413(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), max_batch_documents=2, max_document_chars=50)
    batch = [{"id": f"d{i}", "text": "short"} for i in range(3)]
    response = client.post("/documents", json={"documents": batch})
    assert response.status_code == 413 and "limit of 2" in response.json()["detail"]
    response = client.post("/documents", json={"documents": [{"id": "long", "text": "x" * 51}]})
    assert response.status_code == 413 and "50 characters" in response.json()["detail"]
    assert client.get("/documents/d0").status_code == 404


def test_unknown_document_is_404(client):
    response = client.get("/documents/nope")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_ask_uses_the_stored_documents(client):
    client.post("/documents", json={"documents": [DOC, {"id": "n-2", "text": "Kelp harvest hits a record."}]})
    response = client.post("/ask", json={"question": "Who approved the harbour bridge?", "max_new_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["strategy"] == "rag" and isinstance(body["answer"], str)
    assert [d["id"] for d in body["documents"]] == ["n-1"]
    assert set(body["timings"]) == {"retrieve_seconds", "generate_seconds"}


def test_ask_without_matching_documents_answers_without_context(client):
    response = client.post("/ask", json={"question": "zzz qqq?", "max_new_tokens": 2})
    assert response.status_code == 200 and response.json()["strategy"] == "none"
    assert response.json()["documents"] == []


@pytest.mark.parametrize(
    "body, status",
    [({"question": "  "}, 422), ({}, 422), ({"question": "q", "top_k": 0}, 422), ({"question": "q", "max_new_tokens": 10_000}, 422)],
)
def test_bad_questions_get_4xx(client, body, status):
    assert client.post("/ask", json=body).status_code == status


def test_overlong_question_is_413(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), max_question_chars=10)
    response = client.post("/ask", json={"question": "x" * 11})
    assert response.status_code == 413 and "limit of 10" in response.json()["detail"]
