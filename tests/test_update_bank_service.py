"""The update bank in the service (``FRESHLM_UPDATE_BANK``), over HTTP with a real Redis and SQLite:
the harness's ``update_bank`` answers, one entry per document, exact deletion, the bank refilled
from SQL after Redis lost it, and the requests it refuses."""

from __future__ import annotations

from unittest.mock import ANY

import pytest
import torch
from pydantic import ValidationError

from service.core.config import Settings
from service.runtime import update_bank_name
from tests.conftest import wait_for, wait_ingested
from tests.test_serving import sse_events
from tests.test_serves_what_it_benchmarks import DOCS, MAX_NEW_TOKENS, QUESTIONS, harness_answers, service_answers
from training.methods import MethodConfig
from training.models import ModelSettings, load_causal_lm
from training.update_bank.runtime import UpdateBankConfig

LR = 0.05  # large enough that one step changes the tiny model's answers


def _entries(client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('freshlm_update_bank_entries{tenant="default"}'):
            return float(line.split()[-1])
    return -1.0


def _bank_settings(model_dir, encoder_dir) -> dict:
    return {"base_model": str(model_dir), "encoder": str(encoder_dir), "updater": "uniform", "adapter_lr": LR,
            "update_bank": True}


def test_update_bank_answers_equal_through_the_harness_and_the_service(make_client, sharp_model_dir,
                                                                        tiny_encoder_dir):
    model, tokenizer = load_causal_lm(str(sharp_model_dir), ModelSettings(base_model=str(sharp_model_dir), device="cpu"))
    config = MethodConfig(base_model=str(sharp_model_dir), max_new_tokens=MAX_NEW_TOKENS, meta_ft_lr=LR,
                          update_bank=UpdateBankConfig(updater="uniform", encoder=str(tiny_encoder_dir)))
    untouched = harness_answers(model, tokenizer, "no_context", config)
    expected = harness_answers(model, tokenizer, "update_bank", config)
    assert expected != untouched  # the entries do change the answers
    client = make_client(**_bank_settings(sharp_model_dir, tiny_encoder_dir))
    served = service_answers(client, "adapter")
    assert all(s["strategy"] == "adapter" and s["adapter_version"] is None for s in served)
    assert all(len(s["update_documents"]) == 1 for s in served)
    assert [s["answer"] for s in served] == expected
    assert client.get("/adapters").json()["versions"] == []  # no live adapter: nothing accumulates
    assert client.post("/adapters/rebuild").status_code == 400
    body = {"question": QUESTIONS[0].question, "strategy": "adapter", "max_new_tokens": MAX_NEW_TOKENS, "stream": True}
    with client.stream("POST", "/ask", json=body) as response:
        events = sse_events(response)
    assert [k for k, _ in events][-1] == "done" and events[0][0] == "token"  # tokens stream from the bank's rows
    assert events[-1][1]["answer"] == expected[0] and events[-1][1]["update_documents"] == served[0]["update_documents"]


def test_update_bank_entries_are_deleted_exactly_and_refilled_from_sql(make_server, tiny_model_dir, tiny_encoder_dir,
                                                                      redis_client):
    server = make_server(**_bank_settings(tiny_model_dir, tiny_encoder_dir))
    client = server.client
    assert client.get("/readyz").json()["checks"]["update_bank"] == "ok"
    assert client.post("/documents", json={"documents": [{"id": d.id, "text": d.text} for d in DOCS]}).status_code == 202
    wait_ingested(client, [d.id for d in DOCS])
    assert _entries(client) == len(DOCS)

    asked = client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "adapter"}).json()
    (chosen,) = asked["update_documents"]
    deleted = client.delete(f"/documents/{chosen}").json()
    assert deleted["update_entry_removed"] and not deleted["absorbed_by_live_adapter"]
    assert _entries(client) == len(DOCS) - 1
    again = client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "adapter"}).json()
    assert again["update_documents"] and chosen not in again["update_documents"]

    name = update_bank_name(server.app.state.settings)
    lost = [k for k in redis_client.scan_iter(match=f"*{name}*")]
    assert lost
    redis_client.delete(*lost)  # Redis lost the bank (restarted without its data)
    wait_for(lambda: _entries(client) == len(DOCS) - 1, what="the update bank refilled from SQL")
    refilled = client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "adapter"}).json()
    assert refilled["update_documents"] == again["update_documents"] and refilled["answer"] == again["answer"]

    # a full rebuild rewrites every entry: one overwritten with a zero update gets its step back
    bank = server.app.state.runtime.bank_for("default").bank
    (target,) = again["update_documents"]
    ids, keys = bank.keys()
    (entry,) = bank.get([target])
    bank.put(target, torch.zeros_like(entry), keys[ids.index(target)])
    assert client.post("/memory/rebuild").status_code == 202
    wait_for(lambda: torch.equal(bank.get([target])[0], entry), what="the rebuilt entry")
    assert client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "adapter"}).json() == {
        **again, "timings": ANY}


def test_update_bank_and_mac_are_not_read_together(make_client, tiny_model_dir, tiny_encoder_dir, mac_artifact_dir):
    client = make_client(**_bank_settings(tiny_model_dir, tiny_encoder_dir), mac_artifact=str(mac_artifact_dir))
    assert client.post("/documents", json={"documents": [{"id": "a", "text": DOCS[0].text}]}).status_code == 202
    wait_ingested(client, ["a"])
    refused = client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "mac+adapter"})
    assert refused.status_code == 400 and "update bank" in refused.json()["detail"]
    both = client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "adapter"}).json()
    assert both["update_documents"] == ["a"] and both["memory_documents"] == []
    assert client.post("/ask", json={"question": QUESTIONS[0].question, "strategy": "mac"}).json()["memory_documents"] == ["a"]


def test_update_bank_needs_an_updater():
    with pytest.raises(ValidationError, match="FRESHLM_UPDATER"):
        Settings(_env_file=None, update_bank=True)


@pytest.mark.real_model
def test_smollm2_update_bank_answers_equal_through_the_harness_and_the_service(make_client):
    """The shipped meta-trained init on SmolLM2 with the QA-format tuning, at its own lr."""
    from service.runtime import load_base_model
    from training.artifacts import shipped_artifact

    init = shipped_artifact("meta-ft", Settings(_env_file=None).base_model)
    settings = Settings(_env_file=None, updater=str(init), update_bank=True)
    model, tokenizer = load_base_model(settings)
    expected = harness_answers(model, tokenizer, "update_bank", MethodConfig(max_new_tokens=MAX_NEW_TOKENS))
    served = service_answers(make_client(updater=str(init), update_bank=True), "adapter")
    assert [s["update_documents"] for s in served] == [list(q.doc_ids) for q in QUESTIONS]  # each its own document
    assert [s["answer"] for s in served] == expected


def test_each_tenant_applies_only_its_own_update_bank(make_server, tiny_model_dir, tiny_encoder_dir):
    from service.runtime import tenant_bank
    from tests.test_tenants import A_DOCS, B_DOCS, CANARY, OPERATOR, _ingested, _key

    server = make_server(**_bank_settings(tiny_model_dir, tiny_encoder_dir), admin_api_keys=["operator-key"])
    client = server.client
    for tenant in ("acme", "beta"):
        assert client.post("/tenants", json={"id": tenant}, headers=OPERATOR).status_code == 201
    a, b = _key(client, "acme", "admin"), _key(client, "beta", "admin")
    assert client.post("/documents", json={"documents": A_DOCS}, headers=a).status_code == 202
    assert client.post("/documents", json={"documents": B_DOCS}, headers=b).status_code == 202
    _ingested(client, a, ["shared-id", "a-only"])
    _ingested(client, b, ["shared-id", "b-2"])
    runtime = server.app.state.runtime
    banks = {t: runtime.bank_for(t).bank for t in ("acme", "beta")}
    assert banks["beta"].bank == tenant_bank(runtime.update_bank.bank.bank, "beta") != banks["acme"].bank
    assert set(banks["acme"].ids()) == {"shared-id", "a-only"} and set(banks["beta"].ids()) == {"shared-id", "b-2"}
    assert not torch.equal(banks["acme"].get(["shared-id"])[0], banks["beta"].get(["shared-id"])[0])  # own texts

    asked = client.post("/ask", json={"question": f"What did {CANARY} approve?", "strategy": "adapter"}, headers=b)
    assert asked.status_code == 200 and set(asked.json()["update_documents"]) <= {"shared-id", "b-2"}
    assert client.delete("/documents/shared-id", headers=b).json()["update_entry_removed"]
    assert set(banks["acme"].ids()) == {"shared-id", "a-only"} and set(banks["beta"].ids()) == {"b-2"}
