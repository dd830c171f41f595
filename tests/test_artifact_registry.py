"""The artifact registry: content-addressed versions with lineage in SQL (SQLite and PostgreSQL),
the shipped / configured artifacts registered at start, GET /artifacts and the operator's
activate, and the live MAC switch: the worker writes the new artifact's bank in bounded steps
while answers keep the old one, then switches; the API follows without a restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from service.core.config import Settings
from service.migrate import upgrade_database
from service.db import open_database
from tests.conftest import wait_for, wait_ingested
from training import artifact_registry as registry
from training.artifacts import read_manifest
from training.mac.model import load_mac, save_mac
from training.mac.runtime import bank_name
from training.memory import RedisMemoryBank

DOCS = [{"id": f"r-{i}", "text": f"Report {i}: the harbour of Norvale counted {100 + i} ships in week {i}."}
        for i in range(6)]
ADMIN = {"Authorization": "Bearer op-key"}
USER = {"Authorization": "Bearer user-key"}


def retrained_mac(src: Path, dst: Path, tiny_model_dir: Path, seed: int) -> Path:
    """Another MAC artifact for the same base: the source's weights moved a little, saved by the
    MAC code's own ``save_mac`` (as the retrain job does)."""
    config = AutoConfig.from_pretrained(tiny_model_dir)
    mac, manifest = load_mac(src, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in mac.trainable_tensors().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    save_mac(dst, mac, base_model=manifest.base_model, base_config=config, encoder=manifest.config["encoder"],
             metrics={"note": f"perturbed with seed {seed}"})
    return dst


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_url")


def test_registry_versions_lineage_and_rollback(engine_url, mac_artifact_dir, tiny_model_dir, tmp_path):
    db = open_database(engine_url)
    upgrade_database(db.engine)
    first = registry.register(db.engine, mac_artifact_dir, source="configured", activate_if_none=True)
    assert registry.register(db.engine, mac_artifact_dir, source="configured", activate_if_none=True) == first
    copy = tmp_path / "copy"
    shutil.copytree(mac_artifact_dir, copy)
    assert registry.artifact_id(copy) == first  # content-addressed: where it lies does not matter
    stored_id, stored = registry.store_artifact(copy, tmp_path / "store")
    assert stored_id == first and stored == tmp_path / "store" / "mac" / first
    second_dir = retrained_mac(mac_artifact_dir, tmp_path / "second", tiny_model_dir, seed=1)
    second = registry.register(db.engine, second_dir, source="retrain", parent=first, metrics={"canary_f1": 1.0})
    assert second != first and len(second) == 64
    assert registry.pointer(db.engine, "mac")["active_id"] == first  # registering never activates a second one
    rows = {r["id"]: r for r in registry.list_artifacts(db.engine, "mac")}
    assert rows[second]["parent"] == first and rows[second]["metrics"] == {"canary_f1": 1.0}
    pointer = registry.activate(db.engine, second)
    assert (pointer["active_id"], pointer["serving_id"]) == (second, first)
    assert pointer["progress"] == {"target": second, "done": 0, "total": None}
    assert registry.set_progress(db.engine, "mac", second, 3, 6)
    assert not registry.complete_switch(db.engine, "mac", first)  # only the active target may become serving
    assert registry.complete_switch(db.engine, "mac", second)
    assert registry.pointer(db.engine, "mac")["serving_id"] == second
    back = registry.activate(db.engine, first)  # rollback: a pointer flip, the old bank is rewritten by the worker
    assert back["active_id"] == first and back["progress"]["target"] == first
    with pytest.raises(registry.RegistryError):
        registry.activate(db.engine, "0" * 64)
    qa_like = tmp_path / "other-kind"
    shutil.copytree(mac_artifact_dir, qa_like)
    manifest = read_manifest(qa_like).model_copy(update={"kind": "qa-format"})
    (qa_like / "manifest.json").write_text(manifest.model_dump_json())
    other = registry.register(db.engine, qa_like, source="configured", activate_if_none=True)
    with pytest.raises(registry.RegistryError, match="read once at start"):
        registry.activate(db.engine, other)
    db.dispose()


def _settings(tmp_path, redis_url, tiny_model_dir, mac_artifact_dir, **extra) -> Settings:
    return Settings(_env_file=None, data_dir=tmp_path / "var", redis_url=redis_url, log_json=False,
                    base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), **extra)


def test_worker_writes_the_new_bank_in_steps_then_switches(tmp_path, redis_url, redis_client, tiny_model_dir,
                                                            mac_artifact_dir, one_torch_thread):
    """Deterministic, step by step: while the new bank is incomplete the worker and the answers
    keep the old artifact; the switch happens in the pass that finds nothing missing."""
    from service.runtime import open_runtime
    from service.worker.pipeline import build_worker, run_once

    settings = _settings(tmp_path, redis_url, tiny_model_dir, mac_artifact_dir, worker_batch=2)
    with open_runtime(settings) as rt:
        worker = build_worker(rt)
        old = rt.mac_id
        assert old == registry.artifact_id(mac_artifact_dir) and rt.registered["mac"] == old
        from service import documents
        from service.db import DEFAULT_TENANT

        with rt.db.write() as session:
            documents.store_batch(session, DEFAULT_TENANT, [_doc(d) for d in DOCS])
            session.commit()
        while run_once(worker):
            pass
        assert len(rt.mac_for(DEFAULT_TENANT).bank) == 6
        new_dir = retrained_mac(mac_artifact_dir, tmp_path / "new", tiny_model_dir, seed=2)
        new = registry.register(rt.db.engine, new_dir, source="retrain", parent=old)
        registry.activate(rt.db.engine, new)
        new_bank = RedisMemoryBank(redis_client, bank=bank_name(new_dir))
        worker.switch.chunk = 4
        worker.switch.step()
        pointer = registry.pointer(rt.db.engine, "mac")
        assert pointer["serving_id"] == old and rt.mac_id == old  # answers still read the complete old bank
        assert pointer["progress"] == {"target": new, "done": 4, "total": 6} and len(new_bank) == 4
        with rt.db.write() as session:  # a document arriving during the switch lands in the old bank...
            documents.store_batch(session, DEFAULT_TENANT, [_doc({"id": "late", "text": "A late report."})])
            session.commit()
        worker.switch.chunk = 1
        run_once(worker)  # ...in the next pass (a one-entry step of the switch, then the claim)
        assert "late" in rt.mac_for(DEFAULT_TENANT).bank and rt.mac_id == old
        assert registry.pointer(rt.db.engine, "mac")["progress"] == {"target": new, "done": 5, "total": 6}  # before the claim
        worker.switch.chunk = 4
        worker.switch.step()  # catches up the late one too, then switches
        pointer = registry.pointer(rt.db.engine, "mac")
        assert pointer["serving_id"] == new and pointer["progress"] is None and rt.mac_id == new
        assert sorted(new_bank.ids()) == sorted([d["id"] for d in DOCS] + ["late"])
        assert rt.mac_for(DEFAULT_TENANT).bank.bank == bank_name(new_dir)


def _doc(d: dict):
    from service.api.schemas import DocumentIn

    return DocumentIn(**d)


def test_api_processes_follow_an_activated_artifact_without_restart(make_server, tiny_model_dir, mac_artifact_dir,
                                                                    redis_client, tmp_path):
    server = make_server(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir),
                         api_keys=["user-key"], admin_api_keys=["op-key"], artifact_poll_seconds=0.2)
    client = server.client
    client.post("/documents", json={"documents": DOCS}, headers=USER)
    wait_ingested(client.__class__(base_url=server.url, headers=USER), [d["id"] for d in DOCS])
    listing = client.get("/artifacts", headers=USER).json()
    (mac,) = [a for a in listing["artifacts"] if a["kind"] == "mac"]
    assert mac["active"] and mac["serving"] and mac["source"] == "configured" and mac["path"] is None
    assert client.get("/artifacts", headers=ADMIN).json()["artifacts"][0]["path"] is not None
    engine = server.app.state.runtime.db.engine
    new_dir = retrained_mac(mac_artifact_dir, tmp_path / "new", tiny_model_dir, seed=3)
    new = registry.register(engine, new_dir, source="retrain", parent=mac["id"], metrics={"canary": {"f1": 1.0}})
    assert client.post(f"/artifacts/{new}/activate", headers=USER).status_code == 403
    assert client.post(f"/artifacts/{'f' * 64}/activate", headers=ADMIN).status_code == 404
    assert client.post("/artifacts/not-an-id/activate", headers=ADMIN).status_code == 422
    activated = client.post(f"/artifacts/{new}/activate", headers=ADMIN)
    assert activated.status_code == 200 and activated.json()["active"] == new
    ready = wait_for(lambda: (r := client.get("/readyz").json())["artifacts"]["mac"]["loaded"] == new and r,
                     what="the API to answer with the new artifact")
    assert ready["artifacts"]["mac"] == {"active": new, "serving": new, "loaded": new, "switch": None}
    assert sorted(RedisMemoryBank(redis_client, bank=bank_name(new_dir)).ids()) == sorted(d["id"] for d in DOCS)
    body = client.post("/ask", json={"question": "How many ships in week 2?", "strategy": "mac",
                                     "max_new_tokens": 3}, headers=USER).json()
    assert body["strategy"] == "mac" and len(body["memory_documents"]) == 1
    metrics = client.get("/metrics").text
    assert f'freshlm_artifact_info{{active="{new}",kind="mac",loaded="{new}",serving="{new}"}} 1.0' in metrics
    back = client.post(f"/artifacts/{mac['id']}/activate", headers=ADMIN).json()  # rollback
    assert back["active"] == mac["id"]
    wait_for(lambda: client.get("/readyz").json()["artifacts"]["mac"]["loaded"] == mac["id"], what="the rollback")
