"""Contract of the memory bank, run against the in-process bank and a real redis-server."""

import pytest
import redis
import torch

from training.memory import RedisMemoryBank
from training.memory import InMemoryMemoryBank, MemoryBank


@pytest.fixture(params=["in_memory", "redis"])
def bank(request) -> MemoryBank:
    if request.param == "in_memory":
        return InMemoryMemoryBank()
    return RedisMemoryBank(request.getfixturevalue("redis_client"), bank="test")


def test_round_trip_keeps_fp16_precision(bank):
    memory = torch.randn(4, 16)
    bank.put("doc-1", memory, key=torch.randn(8))
    (restored,) = bank.get(["doc-1"])
    assert restored.dtype == torch.float32 and restored.shape == (4, 16)
    assert torch.allclose(restored, memory.half().float())
    assert bank.nbytes("doc-1") == (4 * 16 + 8) * 2


def test_missing_ids_come_back_as_none_in_order(bank):
    bank.put("a", torch.ones(2, 3))
    bank.put("b", torch.zeros(2, 3))
    got = bank.get(["b", "missing", "a"])
    assert got[1] is None and torch.equal(got[0], torch.zeros(2, 3)) and torch.equal(got[2], torch.ones(2, 3))
    assert bank.get([]) == []


def test_put_replaces_and_counts_once(bank):
    bank.put("a", torch.ones(2, 3), key=torch.ones(4))
    bank.put("a", torch.full((5, 3), 2.0))  # replacement without a key drops the old key
    assert len(bank) == 1 and bank.ids() == ["a"]
    assert bank.get(["a"])[0].shape == (5, 3)
    assert bank.keys() == ([], None)


def test_delete_is_exact(bank):
    bank.put("a", torch.ones(1, 2), key=torch.ones(3))
    bank.put("b", torch.ones(1, 2), key=torch.zeros(3))
    assert bank.delete("a") is True and bank.delete("a") is False
    assert "a" not in bank and "b" in bank and len(bank) == 1
    ids, keys = bank.keys()
    assert ids == ["b"] and keys.shape == (1, 3)
    assert bank.get(["a"]) == [None]


def test_keys_stack_for_top_k_selection(bank):
    for i in range(3):
        bank.put(f"d{i}", torch.zeros(1, 2), key=torch.full((4,), float(i)))
    bank.put("no-key", torch.zeros(1, 2))
    ids, keys = bank.keys()
    assert sorted(ids) == ["d0", "d1", "d2"] and keys.shape == (3, 4)
    for doc_id, row in zip(ids, keys):
        assert torch.equal(row, torch.full((4,), float(doc_id[1:])))


def test_clear_empties_the_bank(bank):
    bank.put("a", torch.ones(1, 2))
    bank.clear()
    assert len(bank) == 0 and bank.ids() == []


def test_redis_entries_survive_a_new_connection_and_use_one_hash_tag(redis_url, redis_client):
    RedisMemoryBank(redis_client, bank="shared").put("doc-9", torch.arange(6.0).reshape(2, 3))
    other = RedisMemoryBank(redis.Redis.from_url(redis_url), bank="shared")
    assert torch.equal(other.get(["doc-9"])[0], torch.arange(6.0).reshape(2, 3))
    keys = sorted(k.decode() for k in redis_client.keys("*"))
    assert keys == ["freshlm:{shared}:ids", "freshlm:{shared}:m:doc-9"]
    # banks of different artifacts never see each other's entries
    assert len(RedisMemoryBank(redis_client, bank="other")) == 0


@pytest.fixture(params=["in_memory", "redis"])
def int8_bank(request) -> MemoryBank:
    if request.param == "in_memory":
        return InMemoryMemoryBank(storage="int8")
    return RedisMemoryBank(request.getfixturevalue("redis_client"), bank="test-int8", storage="int8")


def test_int8_storage_is_within_half_a_step_and_about_half_the_bytes(int8_bank):
    memory = torch.randn(3, 4, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]  # scales far apart
    memory[0, 0] = 0.0  # an all-zero vector must survive too
    int8_bank.put("doc-1", memory, key=torch.randn(8))
    (restored,) = int8_bank.get(["doc-1"])
    assert restored.dtype == torch.float32 and restored.shape == memory.shape
    step = memory.abs().amax(-1, keepdim=True) / 127
    assert ((restored - memory).abs() <= step * 0.51 + 1e-6).all()
    assert torch.equal(restored[0, 0], torch.zeros(64))
    assert int8_bank.nbytes("doc-1") == 3 * 4 * 64 + 3 * 4 * 2 + 8 * 2  # int8 values, fp16 scales, fp16 key
    assert int8_bank.nbytes("doc-1") < 0.55 * (3 * 4 * 64 + 8) * 2


def test_a_redis_bank_switched_to_int8_still_reads_its_fp16_entries(redis_client):
    memory = torch.randn(2, 64)
    RedisMemoryBank(redis_client, bank="switch").put("old", memory)
    switched = RedisMemoryBank(redis_client, bank="switch", storage="int8")
    switched.put("new", memory)
    old, new = switched.get(["old", "new"])
    assert torch.equal(old, memory.half().float())  # written as fp16, read as fp16
    assert not torch.equal(new, old) and torch.allclose(new, memory, atol=memory.abs().max().item() / 127)


@pytest.mark.parametrize("make", [lambda: InMemoryMemoryBank(storage="int4"),
                                  lambda: RedisMemoryBank(redis.Redis(), storage="bf16")])
def test_an_unknown_storage_is_refused_up_front(make):
    with pytest.raises(ValueError, match="unknown memory storage"):
        make()
