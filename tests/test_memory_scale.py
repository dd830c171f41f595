"""A memory bank at scale: the in-process key index answers top-k without reading every key from
Redis and follows other processes' writes through the bank's change log; entries with a TTL are
evicted by a memory-limited Redis (volatile-lru), and a question that chooses an evicted entry is
answered from the document's text while the worker rebuilds the entry from SQL."""

import numpy as np
import pytest
import redis
import torch

from service.redis_server import start_embedded_redis
from tests.conftest import wait_for, wait_ingested
from training.mac.runtime import bank_name
from training.memory import InMemoryMemoryBank, RedisMemoryBank
from training.memory.key_index import KeyIndex, sign_codes


def unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids: list[str], keys: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    return [ids[i] for i in np.argsort(-(keys @ query), kind="stable")[:k]]


def lookup(ids: list[str], keys: np.ndarray):
    """``exact_keys`` over a dict the test keeps current, as a bank's store is."""
    store = dict(zip(ids, keys))
    return store, lambda wanted: [store.get(i) for i in wanted]


def test_key_index_is_exact_top_k_through_adds_replacements_and_removes():
    index, keys = KeyIndex(rescore=1000), unit(600)  # every key rescored: exact
    ids = [f"d{i}" for i in range(600)]
    index.add(ids, keys)
    store, exact = lookup(ids, keys)
    query = unit(1, seed=1)[0]
    assert index.search(query, 5, exact) == brute(ids, keys, query, 5)
    index.remove(ids[::2])
    for i in ids[::2]:
        del store[i]
    keys[1] = store["d1"] = query  # replaced by the query itself: now the best
    index.add(["d1"], keys[1:2] * 3)
    live = ids[1::2]
    assert index.search(query, 4, exact) == brute(live, keys[1::2], query, 4) and index.search(query, 1, exact) == ["d1"]
    store["new"] = unit(1, seed=7)[0]
    index.add(["new"], store["new"][None])  # reuses a freed row
    assert len(index) == 301 and "new" in index and "d0" not in index
    assert len(index.search(query, 1000, exact)) == 301 and KeyIndex().search(query, 3, exact) == []
    # per key: one sign bit per dimension (16 -> one 64-bit word), a live flag, an 8-byte id hash and
    # the id's bytes (4 here), no Python object; the arrays grown a quarter at a time
    assert index.nbytes() <= (8 + 1 + 8 + 4) * (601 * 1.25 + 256)
    assert sorted(index.ids()) == sorted(live + ["new"])


def test_key_index_ids_of_any_length_and_script_round_trip():
    """Ids live as UTF-8 bytes in a fixed-width array that widens for a longer id; an id given
    twice in one add takes one row (the later key); removing and re-adding finds the same id."""
    index, keys = KeyIndex(rescore=100), unit(5)
    index.add(["a", "b"], keys[:2])
    long_id, other = "дoc-" + "é" * 40, "新闻-7"
    index.add([long_id, other, long_id], keys[2:5])  # long_id twice: the last key wins
    assert len(index) == 4 and long_id in index and "a" in index and "дoc-" not in index
    _, exact = lookup(["a", "b", long_id, other], np.stack([keys[0], keys[1], keys[4], keys[3]]))
    assert index.search(keys[4], 1, exact) == [long_id] and index.search(keys[3], 1, exact) == [other]
    index.remove([other, "missing"])
    assert len(index) == 3 and other not in index and sorted(index.ids()) == sorted(["a", "b", long_id])
    index.add([other], keys[3:4])
    assert index.search(keys[3], 1, exact) == [other] and len(index) == 4


def test_key_index_rescores_its_nearest_codes_with_the_exact_keys():
    """Fewer keys rescored than stored: a stored key always finds itself (Hamming distance 0), a
    query near one key finds it, and the candidates are the codes nearest to the query."""
    dim, n = 384, 3000
    keys, ids = unit(n, dim), [f"d{i}" for i in range(n)]
    index = KeyIndex(rescore=32)
    index.add(ids, keys)
    _, exact = lookup(ids, keys)
    assert all(index.search(keys[i], 1, exact) == [ids[i]] for i in range(0, n, 97))
    noisy = keys[:50] + 0.05 * unit(50, dim, seed=3)  # cosine ~0.999 with its key
    assert [index.search(q, 1, exact)[0] for q in noisy] == ids[:50]
    candidates = index.candidates(keys[0], 32)
    assert len(candidates) == 32 and "d0" in candidates
    distance = np.bitwise_count(sign_codes(keys) ^ sign_codes(keys[:1])).sum(axis=1)
    worst_kept = max(distance[int(c[1:])] for c in candidates)
    assert (distance < worst_kept).sum() < 32 <= (distance <= worst_kept).sum()  # the 32 nearest codes
    assert exact(["gone"]) == [None] and index.search(keys[0], 1, lambda w: [None] * len(w)) == []


def test_a_bank_follows_another_process_writes_through_the_change_log(redis_client):
    writer = RedisMemoryBank(redis_client, bank="scale")
    reader = RedisMemoryBank(redis.Redis(connection_pool=redis_client.connection_pool), bank="scale")
    keys = torch.from_numpy(unit(20))
    for i in range(10):
        writer.put(f"d{i}", torch.zeros(2, 3), key=keys[i])
    assert reader.search(keys[3], 1) == ["d3"]  # first call: loads every key
    writer.put("d10", torch.zeros(2, 3), key=keys[10])
    writer.delete("d3")
    writer.put("d4", torch.zeros(2, 3), key=keys[11])  # replaced key
    assert reader.search(keys[10], 1) == ["d10"] and reader.search(keys[11], 1) == ["d4"]
    assert "d3" not in reader.search(keys[3], 11) and len(reader.index) == 10
    # an untrimmed log is read incrementally: no reload
    reader.index.remove(["d0"])
    writer.put("d12", torch.zeros(2, 3), key=keys[12])
    assert "d0" not in reader.search(keys[0], 20) and "d12" in reader.search(keys[12], 1)
    # a log trimmed past what the reader applied makes it reload the keys hash
    writer.put("d13", torch.zeros(2, 3), key=keys[13])
    redis_client.xtrim("freshlm:{scale}:log", maxlen=0)
    assert reader.search(keys[0], 1) == ["d0"] and reader.search(keys[13], 1) == ["d13"]
    writer.clear()
    assert reader.search(keys[0], 3) == []


def test_entries_written_before_the_keys_hash_are_found_by_search(redis_client):
    memory, key = torch.zeros(2, 3), torch.from_numpy(unit(1)[0])
    base = "freshlm:{old-keys}"
    redis_client.hset(f"{base}:m:a", mapping={"memory": memory.half().numpy().tobytes(), "shape": "2,3",
                                              "key": key.half().numpy().tobytes()})
    redis_client.sadd(f"{base}:ids", "a")
    bank = RedisMemoryBank(redis_client, bank="old-keys")
    assert bank.search(key, 1) == ["a"]
    assert redis_client.hexists(f"{base}:keys", "a")  # copied into the keys hash


def test_the_in_process_bank_searches_like_it_stacks_keys():
    bank = InMemoryMemoryBank()
    keys = torch.from_numpy(unit(30))
    for i in range(30):
        bank.put(f"d{i}", torch.zeros(2, 3), key=keys[i])
    bank.delete("d5")
    ids, stacked = bank.keys()
    query = torch.from_numpy(unit(1, seed=3)[0])
    assert bank.search(query, 4) == brute(ids, stacked.numpy(), query.numpy(), 4)


DOCS = [{"id": f"e-{n}", "text": text} for n, text in enumerate([
    "The council approved the harbour bridge on Tuesday.",
    "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
    "Scientists reported a record harvest of kelp near the cape.",
])]


def test_a_memory_limited_redis_evicts_entries_and_questions_fall_back_to_text_while_they_are_rebuilt(
        make_client, tiny_model_dir, mac_artifact_dir, tmp_path):
    server = start_embedded_redis(tmp_path / "redis", persist=False)
    try:
        store = redis.Redis.from_url(server.url)
        store.config_set("maxmemory-policy", "volatile-lru")
        client = make_client(base_model=str(tiny_model_dir), mac_artifact=str(mac_artifact_dir), redis_url=server.url,
                             mac_entry_ttl_seconds=86400, mac_top_k=1)
        client.post("/documents", json={"documents": DOCS})
        wait_ingested(client, [d["id"] for d in DOCS])
        bank = RedisMemoryBank(store, bank=bank_name(mac_artifact_dir))
        entries = [f"freshlm:{{{bank.bank}}}:m:{d['id']}" for d in DOCS]
        assert all(0 < store.ttl(e) <= 86400 for e in entries)
        question = {"question": DOCS[1]["text"], "strategy": "mac", "max_new_tokens": 4}
        before = client.post("/ask", json=question).json()
        chosen = before["memory_documents"]
        assert len(chosen) == 1 and before["memory_fallback"] == []
        # squeeze Redis: at its memory limit, a write of non-volatile data evicts the entries (they have a TTL)
        unlimited = store.config_get("maxmemory")
        store.config_set("maxmemory", int(store.info("memory")["used_memory"]))
        with pytest.raises(redis.exceptions.ResponseError):  # nothing volatile left to evict: OOM
            for n in range(64):
                store.set(f"filler-{n}", b"x" * 65536)
        assert not any(store.exists(e) for e in entries)  # every entry was evicted ...
        assert store.hlen(f"freshlm:{{{bank.bank}}}:keys") == 3  # ... never the keys, ids or log
        store.delete(*[f"filler-{n}" for n in range(64)])
        store.config_set("maxmemory", unlimited["maxmemory"])
        during = client.post("/ask", json=question)
        assert during.status_code == 200
        body = during.json()
        assert body["memory_fallback"] == chosen and body["memory_documents"] == []
        assert body["strategy"] == "mac"
        wait_for(lambda: store.exists(f"freshlm:{{{bank.bank}}}:m:{chosen[0]}"), what="the entry to be rebuilt")
        wait_for(lambda: not bank.missing(), what="the missing set to empty")
        after = client.post("/ask", json=question).json()
        assert after["memory_documents"] == chosen and after["memory_fallback"] == []
        assert after["answer"] == before["answer"]  # the rebuilt entry is the same entry
    finally:
        server.stop()
