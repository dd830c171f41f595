"""The HTTP API through a real client over loopback: tiny model, real Redis, SQLite (and PostgreSQL)."""

import json
import logging

import pytest
import torch

from tests.conftest import wait_ingested

DOC = {"id": "n-1", "title": "Bridge", "text": "The council approved the harbour bridge on Tuesday."}


def test_healthz_pings_database_and_redis(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_without_artifacts_serves_retrieval_and_says_so(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["checks"]["model"] == "ok" and body["checks"]["schema"] == "ok" and body["checks"]["worker"] == "ok"
    assert body["checks"]["mac_artifact"].startswith("not configured")
    assert body["strategies"] == ["rag"]


def test_readyz_is_503_with_the_reason_when_an_artifact_is_broken(make_client, tiny_model_dir, tmp_path):
    (tmp_path / "not-mac").mkdir()
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(tmp_path / "not-mac"))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "manifest.json is missing" in response.json()["checks"]["mac_artifact"]
    # still answers with retrieval
    assert client.post("/ask", json={"question": "anything?", "max_new_tokens": 2}).status_code == 200


def test_post_is_durable_pending_then_ingested(client):
    response = client.post("/documents", json={"documents": [DOC]})
    assert response.status_code == 202
    (status,) = response.json()["documents"]
    assert status == {"id": "n-1", "status": "pending", "created": True, "status_url": status["status_url"]}
    assert status["status_url"] == "/documents/n-1"  # relative: never built from the Host header
    (record,) = wait_ingested(client, ["n-1"])
    assert record["status"] == "ingested" and record["text"] == DOC["text"] and record["attempts"] == 1
    assert record["ingested_at"] is not None and record["memory_written"] is False


def test_documents_persist_across_restarts(make_client, tiny_model_dir, tmp_path):
    first = make_client(base_model=str(tiny_model_dir), data_dir=tmp_path / "persist", embedded_worker=False)
    assert first.post("/documents", json={"documents": [DOC]}).status_code == 202
    second = make_client(base_model=str(tiny_model_dir), data_dir=tmp_path / "persist")
    assert second.get("/documents/n-1").json()["text"] == DOC["text"]
    assert wait_ingested(second, ["n-1"])[0]["status"] == "ingested"  # the queue survived the restart


def test_same_content_is_a_no_op_and_different_content_conflicts(client):
    client.post("/documents", json={"documents": [DOC]})
    again = client.post("/documents", json={"documents": [DOC]})
    assert again.status_code == 202 and again.json()["documents"][0]["created"] is False
    changed = client.post("/documents", json={"documents": [{**DOC, "text": "Something else."}]})
    assert changed.status_code == 409 and "n-1" in changed.json()["detail"]
    assert changed.json()["type"] == "conflict"
    assert client.get("/documents", params={"limit": 10}).json()["total"] == 1


def test_conflicting_batch_writes_nothing(client):
    batch = [{"id": "fresh", "text": "new"}, {"id": "dup", "text": "one"}, {"id": "dup", "text": "two"}]
    assert client.post("/documents", json={"documents": batch}).status_code == 409
    assert client.get("/documents/fresh").status_code == 404


def test_list_is_paged_and_filters_by_status(client):
    docs = [{"id": f"p{i:02d}", "text": f"Story number {i}."} for i in range(7)]
    client.post("/documents", json={"documents": docs})
    wait_ingested(client, [d["id"] for d in docs])
    first = client.get("/documents", params={"limit": 3}).json()
    assert first["total"] == 7 and len(first["items"]) == 3 and first["next_offset"] == 3
    assert all(item["text"] is None for item in first["items"])
    seen = [i["id"] for i in first["items"]]
    offset = first["next_offset"]
    while offset is not None:
        page = client.get("/documents", params={"limit": 3, "offset": offset}).json()
        seen += [i["id"] for i in page["items"]]
        offset = page["next_offset"]
    assert sorted(seen) == [d["id"] for d in docs] and len(set(seen)) == 7
    assert client.get("/documents", params={"status": "pending"}).json()["total"] == 0
    assert client.get("/documents", params={"status": "ingested"}).json()["total"] == 7
    assert client.get("/documents", params={"limit": 0}).status_code == 422


def test_delete_erases_the_document_and_its_retrieval(client):
    client.post("/documents", json={"documents": [DOC, {"id": "n-2", "text": "Kelp harvest hits a record."}]})
    wait_ingested(client, ["n-1", "n-2"])
    response = client.delete("/documents/n-1")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "deleted" and body["absorbed_by_live_adapter"] is False
    assert body["memory_entry_removed"] is False and body["live_adapter_version"] is None
    record = client.get("/documents/n-1").json()
    assert record["status"] == "deleted" and record["text"] == "" and record["deleted_at"] is not None
    answer = client.post("/ask", json={"question": "Who approved the harbour bridge?", "max_new_tokens": 2}).json()
    assert "n-1" not in [d["id"] for d in answer["documents"]]
    assert client.delete("/documents/never").status_code == 404
    # the id can be used again
    again = client.post("/documents", json={"documents": [DOC]}).json()["documents"][0]
    assert again["created"] is True and again["status"] == "pending"


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
        ({"documents": [{"id": "x", "text": "a\udc80b"}]}, "unicode string"),
        ({"documents": [{"id": "x", "text": "a\x00b"}]}, "NUL"),
        ({}, "Field required"),
    ],
)
def test_bad_documents_get_422_with_a_message(client, body, needle):
    response = client.post("/documents", content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert needle in response.text and response.json()["type"] == "validation_error"


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


def test_unknown_document_is_404_with_a_request_id(client):
    response = client.get("/documents/nope", headers={"X-Request-ID": "req-abc"})
    assert response.status_code == 404 and "nope" in response.json()["detail"]
    assert response.headers["x-request-id"] == "req-abc" and response.json()["request_id"] == "req-abc"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32  # made up when not given


def test_request_id_is_bound_into_structured_logs(client, caplog):
    from service.core.logging import JsonFormatter

    with caplog.at_level(logging.INFO, logger="freshlm.access"):
        client.get("/documents/nope", headers={"X-Request-ID": "trace-42"})
    records = [r for r in caplog.records if r.name == "freshlm.access" and "/documents/nope" in r.getMessage()]
    assert records, "no access log line"
    assert records[0].request_id == "trace-42" and records[0].status == 404
    line = json.loads(JsonFormatter().format(records[0]))  # formatted here, outside the request
    assert line["request_id"] == "trace-42" and line["status"] == 404 and line["path"] == "/documents/nope"
    assert line["logger"] == "freshlm.access" and line["level"] == "info"


def test_ask_uses_the_stored_documents(client):
    client.post("/documents", json={"documents": [DOC, {"id": "n-2", "text": "Kelp harvest hits a record."}]})
    wait_ingested(client, ["n-1", "n-2"])
    response = client.post("/ask", json={"question": "Who approved the harbour bridge?", "max_new_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["strategy"] == "rag" and isinstance(body["answer"], str)
    assert [d["id"] for d in body["documents"]] == ["n-1"] and body["adapter_version"] is None
    assert set(body["timings"]) == {"retrieve_seconds", "queue_seconds", "first_token_seconds", "generate_seconds",
                                    "batch_size"}


def test_ask_without_matching_documents_answers_without_context(client):
    response = client.post("/ask", json={"question": "zzz qqq?", "max_new_tokens": 2})
    assert response.status_code == 200 and response.json()["strategy"] == "none"
    assert response.json()["documents"] == []


def test_ask_for_a_component_that_is_not_deployed_is_400(client):
    response = client.post("/ask", json={"question": "q?", "strategy": "mac+rag"})
    assert response.status_code == 400 and "mac" in response.json()["detail"]
    assert client.post("/ask", json={"question": "q?", "strategy": "magic"}).status_code == 422


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


def test_metrics_in_prometheus_format(client):
    client.post("/documents", json={"documents": [DOC]})
    wait_ingested(client, ["n-1"])
    client.post("/ask", json={"question": "Who approved the bridge?", "max_new_tokens": 2})
    text = client.get("/metrics").text
    assert "freshlm_queue_depth 0.0" in text
    assert 'freshlm_documents{status="ingested"} 1.0' in text
    assert 'freshlm_ask_seconds_count{strategy="rag"} 1.0' in text
    assert "freshlm_ingest_seconds_count 1.0" in text
    assert 'freshlm_adapter_info{tenant="default",version="none"} 1.0' in text


def test_api_keys_and_admin_key(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), api_keys=["user-key"], admin_api_keys=["admin-key"])
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    denied = client.post("/documents", json={"documents": [DOC]})
    assert denied.status_code == 401 and denied.json()["type"] == "unauthorized"
    assert client.get("/documents", headers={"Authorization": "Bearer wrong"}).status_code == 401
    user = {"Authorization": "Bearer user-key"}
    assert client.post("/documents", json={"documents": [DOC]}, headers=user).status_code == 202
    assert client.get("/documents/n-1", headers={"X-API-Key": "user-key"}).status_code == 200
    forbidden = client.delete("/documents/n-1", headers=user)
    assert forbidden.status_code == 403 and "admin" in forbidden.json()["detail"]
    assert client.post("/adapters/rebuild", headers=user).status_code == 403
    assert client.delete("/documents/n-1", headers={"X-API-Key": "admin-key"}).status_code == 200


def test_lifecycle_on_postgresql(make_client, tiny_model_dir, postgres_url):
    client = make_client(base_model=str(tiny_model_dir), database_url=postgres_url)
    assert client.get("/readyz").json()["checks"]["schema"] == "ok"
    docs = [DOC, {"id": "n-2", "text": "Kelp harvest hits a record."}]
    assert client.post("/documents", json={"documents": docs}).status_code == 202
    assert client.post("/documents", json={"documents": [{**DOC, "text": "other"}]}).status_code == 409
    assert [r["status"] for r in wait_ingested(client, ["n-1", "n-2"])] == ["ingested", "ingested"]
    assert client.get("/documents").json()["total"] == 2
    assert client.delete("/documents/n-2").json()["status"] == "deleted"
    body = client.post("/ask", json={"question": "Who approved the harbour bridge?", "max_new_tokens": 2}).json()
    assert [d["id"] for d in body["documents"]] == ["n-1"]


def test_a_configured_qa_format_adapter_is_merged_into_the_base(make_client, tiny_model_dir, tmp_path):
    from peft import get_peft_model, get_peft_model_state_dict

    from training.artifacts import save_artifact
    from training.models import load_causal_lm
    from training.qa_tuning import KIND, QATuningConfig, lora_config

    model, _ = load_causal_lm(str(tiny_model_dir))
    cfg = QATuningConfig(lora_top_layers=None)
    peft_model = get_peft_model(model, lora_config(cfg, model))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 1.0)
    save_artifact(tmp_path / "qa", kind=KIND, tensors=get_peft_model_state_dict(peft_model), base_model="tiny",
                  base_config=model.config, config=cfg.model_dump())
    question = {"question": "Who approved the bridge?", "max_new_tokens": 6}
    plain = make_client(base_model=str(tiny_model_dir)).post("/ask", json=question)
    tuned = make_client(base_model=str(tiny_model_dir), qa_tuning=str(tmp_path / "qa"),
                        data_dir=tmp_path / "var-tuned").post("/ask", json=question)
    assert plain.status_code == tuned.status_code == 200
    assert plain.json()["answer"] != tuned.json()["answer"]
