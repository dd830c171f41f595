"""MAC in the service: memory written by the worker to Redis, answers read it, deletes remove it,
and a Redis that comes back empty is refilled from SQL with unchanged answers."""

from training.mac.runtime import bank_name
from training.memory import RedisMemoryBank
from service.redis_server import start_embedded_redis
from tests.conftest import wait_for, wait_ingested

DOCS = [
    {"id": "m-1", "text": "The council approved the new harbour bridge on Tuesday."},
    {"id": "m-2", "text": "In 2031 the city of Norvale opened 12 libraries and 3 museums."},
    {"id": "m-3", "text": "Scientists at the Aurora Institute reported a record harvest of kelp."},
]


def test_int8_storage_setting_reaches_the_redis_bank(make_client, tiny_model_dir, mac_artifact_dir, redis_client):
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), mac_storage="int8")
    client.post("/documents", json={"documents": [{"id": "s-1", "text": DOCS[1]["text"]}]})
    (record,) = wait_ingested(client, ["s-1"])
    assert record["memory_written"]
    bank = RedisMemoryBank(redis_client, bank=bank_name(mac_artifact_dir))
    entry = redis_client.hgetall(bank._entry_key("s-1"))
    assert b"scale" in entry and len(entry[b"memory"]) == bank.get(["s-1"])[0].numel()  # one byte per value
    body = client.post("/ask", json={"question": "How many libraries opened?", "strategy": "mac",
                                     "max_new_tokens": 3}).json()
    assert body["strategy"] == "mac" and body["memory_documents"] == ["s-1"]


def test_mac_memory_round_trip_and_delete(make_client, tiny_model_dir, mac_artifact_dir, redis_client):
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), mac_top_k=2)
    ready = client.get("/readyz").json()
    assert ready["checks"]["mac_artifact"] == "ok" and "mac" in ready["strategies"]
    client.post("/documents", json={"documents": DOCS})
    records = wait_ingested(client, [d["id"] for d in DOCS])
    assert all(r["status"] == "ingested" and r["memory_written"] for r in records)
    bank = RedisMemoryBank(redis_client, bank=bank_name(mac_artifact_dir))
    assert sorted(bank.ids()) == ["m-1", "m-2", "m-3"]
    body = client.post("/ask", json={"question": "How many libraries opened?", "strategy": "mac",
                                     "max_new_tokens": 3}).json()
    assert body["strategy"] == "mac" and len(body["memory_documents"]) == 2  # top-k pre-selection
    assert body["documents"] == []
    both = client.post("/ask", json={"question": "How many libraries opened?", "strategy": "mac+rag",
                                     "max_new_tokens": 3}).json()
    assert both["strategy"] == "mac+rag" and both["documents"][0]["id"] == "m-2"
    deleted = client.delete("/documents/m-2").json()
    assert deleted["memory_entry_removed"] is True and "m-2" not in bank
    assert len(bank) == 2
    assert 'freshlm_memory_bank_entries{tenant="default"} 2.0' in client.get("/metrics").text


def test_redis_restart_with_an_empty_store_rebuilds_the_bank(make_client, tiny_model_dir, mac_artifact_dir, tmp_path):
    server = start_embedded_redis(tmp_path / "redis", persist=False)
    try:
        client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir),
                             redis_url=server.url)
        client.post("/documents", json={"documents": DOCS})
        wait_ingested(client, [d["id"] for d in DOCS])
        question = {"question": "Who approved the harbour bridge?", "strategy": "mac", "max_new_tokens": 5}
        before = client.post("/ask", json=question).json()
        server.stop()
        down = client.post("/ask", json=question)
        assert down.status_code == 503 and down.json()["type"] == "unavailable"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("error")
        server = start_embedded_redis(tmp_path / "redis", persist=False)  # same socket, empty store
        import redis

        fresh = RedisMemoryBank(redis.Redis.from_url(server.url), bank=bank_name(mac_artifact_dir))
        wait_for(lambda: len(fresh) == 3, what="the worker to rebuild the memory bank")
        after = client.post("/ask", json=question).json()
        assert after["answer"] == before["answer"]
        assert sorted(after["memory_documents"]) == sorted(before["memory_documents"])
        assert sorted(fresh.ids()) == ["m-1", "m-2", "m-3"]
    finally:
        server.stop()


def test_rebuild_memory_command_rewrites_every_entry_from_sql(make_client, tiny_model_dir, mac_artifact_dir,
                                                               redis_url, redis_client, tmp_path):
    import json
    import os
    import subprocess
    import sys

    import torch

    from tests.conftest import REPO_ROOT

    data_dir = tmp_path / "var"
    client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), data_dir=data_dir)
    client.post("/documents", json={"documents": DOCS})
    wait_ingested(client, [d["id"] for d in DOCS])
    bank = RedisMemoryBank(redis_client, bank=bank_name(mac_artifact_dir))
    original = dict(zip(bank.ids(), bank.get(bank.ids())))
    bank.put("m-1", torch.zeros(2, 2))  # a corrupted entry: the count is right, the content is not
    env = {**os.environ, "FRESHLM_DATA_DIR": str(data_dir), "FRESHLM_REDIS_URL": redis_url,
           "FRESHLM_BASE_MODEL": str(tiny_model_dir), "FRESHLM_MAC_ARTIFACT": str(mac_artifact_dir),
           "FRESHLM_LOG_JSON": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "service.worker", "--rebuild-memory"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"default": {"written": 3, "removed": 0}}
    for doc_id, memory in original.items():
        assert torch.equal(bank.get([doc_id])[0], memory), doc_id
    # the same through the API (admin route), done by the server's worker
    bank.put("m-2", torch.zeros(2, 2))
    assert client.post("/memory/rebuild").status_code == 202
    wait_for(lambda: bank.get(["m-2"])[0].shape == original["m-2"].shape, what="the memory rebuild")
    assert torch.equal(bank.get(["m-2"])[0], original["m-2"])


def test_mac_runtime_writes_reads_and_answers_without_a_cached_head(tiny_model_dir, mac_artifact_dir, redis_client):
    """``load_mac_runtime`` on a real Redis: entries survive the fp16 round trip, top-k limits what
    a question reads, and answering without a cached head (the adapter path) computes the head
    with the model: the same answer as with the cached one."""
    import torch

    from training.mac.aggregator import iter_bank_entries
    from training.mac.runtime import MacReadConfig, load_mac_runtime
    from training.memory import RedisMemoryBank
    from training.models import ModelSettings, load_causal_lm

    settings = ModelSettings(base_model=str(tiny_model_dir), device="cpu")
    base, tok = load_causal_lm(str(tiny_model_dir), settings)
    bank = RedisMemoryBank(redis_client, bank=bank_name(mac_artifact_dir))
    runtime = load_mac_runtime(mac_artifact_dir, base, tok, bank, MacReadConfig(top_k=2, group_size=1), settings)
    assert runtime.head is not None and runtime.bank.bank == bank_name(mac_artifact_dir)
    runtime.memorize([d["id"] for d in DOCS], [d["text"] for d in DOCS])
    assert runtime.bank.ids() == ["m-1", "m-2", "m-3"]
    with torch.no_grad():
        direct = runtime.mac.memorize(base, tok, runtime.head, [d["text"] for d in DOCS])
    for (entry, key), stored in zip(direct, iter_bank_entries(runtime.bank, runtime.bank.ids(), chunk=2)):
        assert stored.shape == entry.shape
        torch.testing.assert_close(stored, entry.half().float())

    question = "How many libraries opened in Norvale?"
    fed = []  # what the model is fed after the cache: token ids and their positions, call by call
    hook = base.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append((kwargs["input_ids"].tolist(), kwargs["position_ids"].tolist()))
        if kwargs.get("position_ids") is not None else None, with_kwargs=True)
    try:
        ((cached, used),) = runtime.answer(base, [question], max_new_tokens=4)
        with_cached_head, fed[:] = list(fed), []
        ((computed, used_again),) = runtime.answer(base, [question], max_new_tokens=4, head=None)
    finally:
        hook.remove()
    assert computed == cached and used_again == used and len(used) == 2
    assert fed == with_cached_head and fed
    assert fed[0][1][0][0] == runtime.mac.start(runtime.head)  # the question starts after every slot
    runtime.bank.delete(used[0])
    ((_, after),) = runtime.answer(base, [question], max_new_tokens=4)
    assert used[0] not in after and len(after) == 2


def test_memory_writes_wait_for_the_model_lock(tiny_model_dir, mac_artifact_dir, redis_client):
    """The embedded worker shares the API's model: a write waits while an ask holds the lock
    (``service/main.py`` hands the runtime the adapters' lock), then goes through."""
    import threading

    from training.mac.runtime import MacReadConfig, load_mac_runtime
    from training.memory import RedisMemoryBank
    from training.models import ModelSettings, load_causal_lm

    settings = ModelSettings(base_model=str(tiny_model_dir), device="cpu")
    base, tok = load_causal_lm(str(tiny_model_dir), settings)
    bank = RedisMemoryBank(redis_client, bank=bank_name(mac_artifact_dir))
    runtime = load_mac_runtime(mac_artifact_dir, base, tok, bank, MacReadConfig(top_k=1, group_size=1), settings)
    runtime.bank.delete("lock-1")
    written = threading.Event()

    def write() -> None:
        runtime.memorize(["lock-1"], [DOCS[0]["text"]])
        written.set()

    with runtime.model_lock:  # what an ask holds while it generates
        writer = threading.Thread(target=write)
        writer.start()
        assert not written.wait(0.5) and "lock-1" not in runtime.bank
    writer.join(60)
    assert written.is_set() and "lock-1" in runtime.bank
