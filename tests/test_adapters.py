"""Adapter versions through the API: updates from documents, rollback, delete + rebuild, and
questions answered continuously while versions are swapped."""

import json
import os
import subprocess
import sys
import threading
import time

import torch

from service.adapters import store as adapter_store
from service.db import DEFAULT_TENANT, open_database
from tests.conftest import REPO_ROOT, wait_for, wait_ingested
from training.lora import LoraSpec
from training.models import ModelSettings, load_causal_lm
from training.updates import LoraUpdater, UpdateConfig, uniform_weights

DOCS = [
    {"id": "a-1", "text": "The council approved the new harbour bridge on Tuesday."},
    {"id": "a-2", "text": "In 2031 the city of Norvale opened 12 libraries and 3 museums."},
]


def test_documents_update_the_adapter_and_rollback_is_a_pointer_flip(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), updater="uniform", adapter_lr=0.05)
    client.post("/documents", json={"documents": DOCS})
    records = wait_ingested(client, ["a-1", "a-2"])
    listing = client.get("/adapters").json()
    kinds = [v["kind"] for v in listing["versions"]]
    assert kinds == ["initial", "update", "update"]
    initial, first, second = listing["versions"]
    assert listing["active"] == second["version"] == records[1]["adapter_version"]
    assert second["parent"] == first["version"] and first["parent"] == initial["version"]
    assert first["documents"] == ["a-1"] and second["metrics"]["loss"] > 0
    answer = client.post("/ask", json={"question": "Who approved the bridge?", "strategy": "adapter",
                                       "max_new_tokens": 3}).json()
    assert answer["adapter_version"] == second["version"] and answer["strategy"] == "adapter"
    rolled = client.post(f"/adapters/{first['version']}/activate")
    assert rolled.status_code == 200 and rolled.json()["active"] is True
    assert client.get("/adapters").json()["active"] == first["version"]
    again = client.post("/ask", json={"question": "Who approved the bridge?", "strategy": "adapter",
                                      "max_new_tokens": 3}).json()
    assert again["adapter_version"] == first["version"]
    assert client.post("/adapters/0123abcd/activate").status_code == 404
    assert client.post("/adapters/NOT-HEX/activate").status_code == 422


def test_deleting_an_absorbed_document_and_rebuilding_without_it(make_client, tiny_model_dir, tmp_path, redis_url):
    client = make_client(base_model=str(tiny_model_dir), updater="uniform", adapter_lr=0.05)
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, ["a-1", "a-2"])
    deleted = client.delete("/documents/a-1").json()
    assert deleted["absorbed_by_live_adapter"] is True and deleted["rebuild_adapter_url"].endswith("/adapters/rebuild")
    assert client.post("/adapters/rebuild").status_code == 202

    def rebuilt():
        listing = client.get("/adapters").json()
        active = [v for v in listing["versions"] if v["version"] == listing["active"]]
        return active[0] if active and active[0]["kind"] == "rebuild" else None

    version = wait_for(rebuilt, what="the adapter rebuild")
    assert version["documents"] == ["a-2"]
    # the ops guide's CLI form of the same replay (what `docker compose exec worker` runs)
    env = {**os.environ, "FRESHLM_DATA_DIR": str(tmp_path / "var"), "FRESHLM_REDIS_URL": redis_url,
           "FRESHLM_BASE_MODEL": str(tiny_model_dir), "FRESHLM_UPDATER": "uniform", "FRESHLM_ADAPTER_LR": "0.05",
           "FRESHLM_LOG_JSON": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "service.worker", "--rebuild-adapter", "--tenant", DEFAULT_TENANT],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    cli_version = json.loads(out.stdout.strip().splitlines()[-1])[DEFAULT_TENANT]["version"]
    listing = client.get("/adapters").json()
    (replayed,) = [v for v in listing["versions"] if v["version"] == cli_version]
    assert listing["active"] == cli_version and replayed["kind"] == "rebuild" and replayed["documents"] == ["a-2"]
    assert client.delete("/documents/a-2").json()["absorbed_by_live_adapter"] is True
    assert client.get("/readyz").json()["checks"]["updater"] == "ok"


def _distinct_versions(tiny_model_dir, data_dir, count: int) -> list[str]:
    """Versions written with the store's own functions: random LoRA weights, far apart."""
    base, tokenizer = load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))
    config = UpdateConfig(lora=LoraSpec(rank=4).resolved(base), max_tokens=64)
    updater = LoraUpdater(base, tokenizer, uniform_weights(tokenizer, 64), config)
    db = open_database(f"sqlite:///{(data_dir / 'freshlm.db').resolve()}")
    versions = []
    with db.write.begin() as session:
        for seed in range(count):
            gen = torch.Generator().manual_seed(seed)
            tensors = {k: torch.randn(v.shape, generator=gen) for k, v in updater.adapter_tensors().items()}
            version = adapter_store.save_weights(data_dir / "adapters", tensors, config.lora.model_dump())
            adapter_store.record_version(session, DEFAULT_TENANT, version, parent=None, kind="update", documents=[],
                                         metrics={})
            versions.append(version)
    db.dispose()
    return versions


def test_answers_during_swaps_each_run_on_one_version(make_client, tiny_model_dir, tmp_path):
    data_dir = tmp_path / "var"
    client = make_client(base_model=str(tiny_model_dir), data_dir=data_dir, adapters_loaded=2)
    versions = _distinct_versions(tiny_model_dir, data_dir, 4)
    question = {"question": "What did the harbour board decide?", "strategy": "adapter", "max_new_tokens": 6}
    expected = {}
    for version in versions:  # what each version answers when it is alone
        assert client.post(f"/adapters/{version}/activate").status_code == 200
        body = client.post("/ask", json=question).json()
        assert body["adapter_version"] == version
        expected[version] = body["answer"]
    assert len(set(expected.values())) == len(versions), "versions must answer differently for this test"

    seen: list[tuple[str, str]] = []
    errors: list[str] = []
    done = threading.Event()

    def asker():
        import httpx

        with httpx.Client(base_url=str(client.base_url), timeout=120) as own:
            while not done.is_set():
                response = own.post("/ask", json=question)
                if response.status_code != 200:
                    errors.append(response.text)
                    continue
                body = response.json()
                seen.append((body["adapter_version"], body["answer"]))

    threads = [threading.Thread(target=asker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            for version in versions:  # with adapters_loaded=2, versions are also evicted and reloaded
                assert client.post(f"/adapters/{version}/activate").status_code == 200
                count = len(seen)
                wait_for(lambda v=version, c=count: any(s[0] == v for s in seen[c:]), timeout=120,
                         what=f"an answer on version {version}")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=120)
    assert errors == []
    assert len(seen) >= 12 and {v for v, _ in seen} == set(versions)
    mixed = [(v, a) for v, a in seen if a != expected[v]]
    assert mixed == [], f"{len(mixed)} answers differ from their version's own answer"


def _loaded_tiny(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))[0]


def test_camels_weighting_model_drives_the_updates(make_client, tiny_model_dir, tmp_path):
    from training.camels.weighting_model import WeightingModelConfig, build_weighting_model, save_weighting_model

    base = _loaded_tiny(tiny_model_dir)
    model = build_weighting_model(base, WeightingModelConfig(num_layers=1))
    save_weighting_model(tmp_path / "camels", model, base_model_id=str(tiny_model_dir), base_config=base.config)
    client = make_client(base_model=str(tiny_model_dir), updater=str(tmp_path / "camels"), adapter_lr=0.05)
    assert client.get("/readyz").json()["checks"]["updater"] == "ok"
    client.post("/documents", json={"documents": DOCS[:1]})
    (record,) = wait_ingested(client, ["a-1"])
    versions = client.get("/adapters").json()["versions"]
    assert [v["kind"] for v in versions] == ["initial", "update"]
    assert versions[0]["metrics"]["updater"] == "camels_weighting_model"
    assert record["adapter_version"] == versions[1]["version"]


def test_meta_trained_init_is_the_first_version(make_client, tiny_model_dir, tmp_path):
    from peft import get_peft_model_state_dict

    from training.meta_ft.adapter import MetaAdapterConfig, attach, save_meta_adapter
    from training.updaters import load_updater

    base = _loaded_tiny(tiny_model_dir)
    config = MetaAdapterConfig(variant="lora", rank=2, alpha=4.0, top_layers=1, inner_lr=0.01)
    peft, meta = attach(base, config)
    with torch.no_grad():
        for name, p in meta.items():
            p.add_(0.1)  # a meta-trained init is not the identity
    save_meta_adapter(tmp_path / "meta", peft, meta, config, base_model_id=str(tiny_model_dir),
                      base_config=base.config)
    saved = {k: v.clone() for k, v in get_peft_model_state_dict(peft).items()}
    fresh = _loaded_tiny(tiny_model_dir)
    spec = load_updater(str(tmp_path / "meta"), fresh, None, UpdateConfig(lr=1.0))
    assert spec.config.optimizer == "sgd" and spec.config.lr == 0.01  # the init's own step, not the setting's
    assert spec.config.lora.rank == 2 and spec.config.lora.top_layers == 1
    client = make_client(base_model=str(tiny_model_dir), updater=str(tmp_path / "meta"))
    client.post("/documents", json={"documents": DOCS[:1]})
    wait_ingested(client, ["a-1"])
    initial = client.get("/adapters").json()["versions"][0]
    assert initial["kind"] == "initial" and initial["metrics"]["updater"] == "meta_ft_init"
    assert initial["version"] == adapter_store.version_of(saved, spec.config.lora.resolved(fresh).model_dump())


def test_an_updater_for_another_base_model_is_refused(make_client, tiny_model_dir, tmp_path):
    from training.camels.weighting_model import WeightingModelConfig, build_weighting_model, save_weighting_model
    from training.models import tiny_causal_lm

    other, _ = tiny_causal_lm("gpt2")
    model = build_weighting_model(other, WeightingModelConfig(num_layers=1))
    save_weighting_model(tmp_path / "camels", model, base_model_id="tiny-gpt2", base_config=other.config)
    client = make_client(base_model=str(tiny_model_dir), updater=str(tmp_path / "camels"))
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "trained for base model 'tiny-gpt2'" in ready.json()["checks"]["updater"]


def test_mac_and_adapter_combine_with_a_pinned_version(make_client, tiny_model_dir, mac_artifact_dir):
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), updater="uniform",
                         adapter_lr=0.05, mac_top_k=2, strategy="mac+adapter+rag")
    client.post("/documents", json={"documents": DOCS})
    records = wait_ingested(client, ["a-1", "a-2"])
    assert sorted(client.get("/readyz").json()["strategies"]) == ["adapter", "mac", "rag"]
    body = client.post("/ask", json={"question": "Who approved the harbour bridge?", "strategy": "auto",
                                     "max_new_tokens": 3}).json()
    assert body["strategy"] == "mac+adapter+rag" and body["adapter_version"] == records[1]["adapter_version"]
    assert sorted(body["memory_documents"]) == ["a-1", "a-2"] and body["documents"][0]["id"] == "a-1"
    alone = client.post("/ask", json={"question": "Who approved the harbour bridge?", "strategy": "mac",
                                      "max_new_tokens": 3}).json()
    assert alone["adapter_version"] is None and alone["strategy"] == "mac"


def test_the_guard_rejects_an_update_that_drifts_and_keeps_the_live_version(make_client, tiny_model_dir):
    client = make_client(base_model=str(tiny_model_dir), updater="uniform", adapter_lr=0.05,
                         adapter_max_drift=1e-12)
    client.post("/documents", json={"documents": DOCS[:1]})
    (record,) = wait_ingested(client, ["a-1"])
    assert record["status"] == "ingested" and record["adapter_version"] is None
    assert record["adapter_note"].startswith("update rejected: locality drift")
    listing = client.get("/adapters").json()
    assert [v["kind"] for v in listing["versions"]] == ["initial"]
    assert listing["active"] == listing["versions"][0]["version"]


def test_a_non_finite_update_is_rejected(tiny_model_dir):
    base, tokenizer = load_causal_lm(str(tiny_model_dir), ModelSettings(base_model=str(tiny_model_dir), device="cpu"))

    def nan_weights(text):
        ids = uniform_weights(tokenizer, 64)(text)[0]
        return ids, torch.full((len(ids),), float("nan"))

    updater = LoraUpdater(base, tokenizer, nan_weights, UpdateConfig(lora=LoraSpec(rank=2), max_drift=1.0))
    before = updater.adapter_tensors()
    result = updater.step("The council approved the harbour bridge.")
    assert not result.accepted and "not finite" in result.reason
    after = updater.adapter_tensors()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was undone
    assert updater.optimizer_tensors() == {}  # optimizer state too: Adam never stepped


def test_old_adapter_weights_are_pruned_outside_the_rollback_window(make_client, tiny_model_dir, tmp_path):
    client = make_client(base_model=str(tiny_model_dir), updater="uniform", adapter_lr=0.05, adapter_keep_versions=2)
    docs = [{"id": f"p-{i}", "text": f"Bulletin {i}: the ferry to Islay leaves at {i + 6} o'clock."} for i in range(4)]
    client.post("/documents", json={"documents": docs})
    wait_ingested(client, [d["id"] for d in docs])
    listing = client.get("/adapters").json()
    versions = listing["versions"]
    assert [v["kind"] for v in versions] == ["initial"] + ["update"] * 4
    kept = {v["version"] for v in versions if v["weights_available"]}
    # the initial version (rebuilds start there) and the two newest, the active one among them
    assert kept == {versions[0]["version"], versions[-2]["version"], versions[-1]["version"]}
    assert listing["active"] == versions[-1]["version"]
    def on_disk() -> set[str]:
        return {p.name for p in (tmp_path / "var" / "adapters").iterdir() if not p.name.startswith(".")}

    deadline = time.monotonic() + 30  # the worker prunes right after it publishes: it may still be at it
    while on_disk() != kept and time.monotonic() < deadline:
        time.sleep(0.1)
    assert on_disk() == kept
    pruned = versions[1]["version"]
    refused = client.post(f"/adapters/{pruned}/activate")
    assert refused.status_code == 409 and "rollback window" in refused.json()["detail"]
    assert client.post(f"/adapters/{versions[-2]['version']}/activate").status_code == 200
    # lineage survives pruning: the first document is still known to be in the live adapter
    assert client.delete("/documents/p-0").json()["absorbed_by_live_adapter"] is True
