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
    assert keys == ["freshlm:{shared}:ids", "freshlm:{shared}:log", "freshlm:{shared}:m:doc-9"]  # no key: no keys hash
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


@pytest.mark.parametrize("make", [lambda: InMemoryMemoryBank(storage="int3"),
                                  lambda: RedisMemoryBank(redis.Redis(), storage="bf16")])
def test_an_unknown_storage_is_refused_up_front(make):
    with pytest.raises(ValueError, match="unknown memory storage"):
        make()


# --- KIVI low-bit storage (training/memory/kivi.py) ---------------------------------------------


def kv_entry(layers=3, heads=2, slots=40, dim=64, outlier_channel=5, seed=0) -> torch.Tensor:
    """A key/value entry whose keys have one outlier channel (as real key caches do, KIVI fig. 2)."""
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(layers, 2, heads, slots, dim, generator=generator)
    memory[:, 0, :, :, outlier_channel] *= 100
    return memory


@pytest.fixture(params=["in_memory", "redis"])
def make_bank(request):
    if request.param == "in_memory":
        return lambda storage: InMemoryMemoryBank(storage=storage)
    client = request.getfixturevalue("redis_client")
    return lambda storage: RedisMemoryBank(client, bank=f"test-{storage}", storage=storage)


@pytest.mark.parametrize("storage", ["int4", "int2", "k4v2", "k3v2"])
def test_kivi_storage_keys_per_channel_values_per_token(make_bank, storage):
    from training.memory.base import KIVI_SPECS
    from training.memory.kivi import kivi_bytes

    spec = KIVI_SPECS[storage]
    memory = kv_entry()  # 40 slots
    bank = make_bank(storage)
    bank.put("doc", memory, key=torch.randn(8))
    (restored,) = bank.get(["doc"])
    assert restored.shape == memory.shape and restored.dtype == torch.float32

    def groups(length: int, size: int) -> list[slice]:
        return [slice(start, min(start + size, length)) for start in range(0, length, size)]

    # keys: a group is one channel over key_group tokens (groups of 32: 32 + 8 slots); a clipped
    # group trades its extremes' error for the rest's (its bound: the clip test below)
    for tokens in groups(40, spec.key_group) if not spec.clip else ():
        k, k_hat = memory[:, 0, :, tokens], restored[:, 0, :, tokens]
        step = (k.amax(2) - k.amin(2)) / (2**spec.key_bits - 1)  # [L, H, dim]
        assert ((k - k_hat).abs() <= step[:, :, None] / 2 * 1.01 + 1e-2).all()
    # values: a group is value_group channels of one token
    for channels in groups(64, spec.value_group) if not spec.clip else ():
        v, v_hat = memory[:, 1, ..., channels], restored[:, 1, ..., channels]
        step = (v.amax(-1) - v.amin(-1)) / (2**spec.value_bits - 1)
        assert ((v - v_hat).abs() <= step[..., None] / 2 * 1.01 + 1e-2).all()
    # per channel, the outlier channel does not wash out the others (per token it would: range ~600)
    normal = torch.ones(64, dtype=torch.bool)
    normal[5] = False
    key_error = (memory[:, 0] - restored[:, 0])[..., normal].abs().mean()
    assert key_error < 0.6 * {2: 1, 3: 0.5, 4: 0.25}[spec.key_bits]
    assert bank.nbytes("doc") == kivi_bytes(tuple(memory.shape), spec) + 8 * 2
    fp16 = memory.numel() * 2
    assert bank.nbytes("doc") < (spec.key_bits + spec.value_bits + 3) / 32 * fp16


def test_kivi_bytes_of_a_mac_chunk_and_code_packing():
    from training.memory.kivi import KiviSpec, kivi_bytes, pack_codes, unpack_codes

    chunk = (30, 2, 3, 56, 64)  # SmolLM2: 48 heavy hitters + 8 memory tokens per 256-token chunk
    assert kivi_bytes(chunk, KiviSpec(4, 4)) == 322_560 + 86_400
    assert kivi_bytes(chunk, KiviSpec(2, 2)) == 161_280 + 86_400
    # 4-bit keys, 2-bit values, a key group spanning the 56 slots, values in groups of 32 channels
    assert kivi_bytes(chunk, KiviSpec(4, 2, 64, 32)) == 161_280 + 80_640 + 4 * (30 * 3 * (64 * 1 + 56 * 2))
    for bits in (1, 2, 3, 4, 8):
        codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8)
        packed = pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-1001 * bits // 8)
        assert torch.equal(unpack_codes(packed, bits, 1001), codes)
        if 8 % bits == 0:  # the byte layout int4 / int2 entries were stored with before 3-bit codes came
            per = 8 // bits
            padded = torch.nn.functional.pad(codes, (0, -1001 % per)).view(-1, per)
            assert torch.equal(packed, (padded << torch.arange(0, 8, bits, dtype=torch.uint8)).sum(1, dtype=torch.uint8))


def test_kivi_clip_search_never_loses_to_min_max_and_wins_on_heavy_tails():
    """``clip``: each group keeps the range of least squared error, so per group it is at most
    min / max quantization's error, and on heavy-tailed values (one far value per group) clearly less."""
    from training.memory.kivi import KiviSpec, dequantize_kv, quantize_kv

    torch.manual_seed(1)
    memory = torch.distributions.StudentT(2.0).sample((3, 2, 2, 56, 64))  # heavy tails
    shape = tuple(memory.shape)
    errors = {}
    for clip in (False, True):
        spec = KiviSpec(3, 2, 64, 64, clip=clip)
        restored = dequantize_kv(*quantize_kv(memory, spec), shape, spec)
        errors[clip] = (restored - memory) ** 2
    keys_min_max, keys_clip = (errors[c][:, 0].sum(2) for c in (False, True))  # per channel (a key group)
    values_min_max, values_clip = (errors[c][:, 1].sum(-1) for c in (False, True))  # per token (a value group)
    assert (keys_clip <= keys_min_max * (1 + 1e-5) + 1e-6).all()
    assert (values_clip <= values_min_max * (1 + 1e-5) + 1e-6).all()
    assert errors[True].sum() < 0.7 * errors[False].sum()


def test_kivi_storage_refuses_entries_that_are_not_key_values():
    with pytest.raises(ValueError, match="layers, 2, kv_heads"):
        InMemoryMemoryBank(storage="int4").put("x", torch.randn(4, 64))


def test_entries_written_before_the_storage_field_stay_readable(redis_client):
    """Hashes as the bank wrote them before issue 16 (no ``storage`` field): fp16, and int8 + scale;
    and a KIVI entry with the ``group`` field it held before 2026-12-03."""
    import numpy as np

    memory = torch.randn(2, 2, 3, 64)
    bank = RedisMemoryBank(redis_client, bank="legacy", storage="int2")
    base = "freshlm:{legacy}"
    shape = ",".join(map(str, memory.shape))
    redis_client.hset(f"{base}:m:fp16", mapping={"memory": memory.half().numpy().tobytes(), "shape": shape})
    scale = (memory.abs().amax(-1, keepdim=True) / 127).half()
    codes = (memory / scale.float()).round().clamp(-127, 127).to(torch.int8)
    redis_client.hset(f"{base}:m:int8", mapping={"memory": codes.numpy().tobytes(), "shape": shape,
                                                 "scale": scale.numpy().tobytes()})
    redis_client.sadd(f"{base}:ids", "fp16", "int8")
    bank.put("int2", kv_entry(slots=8))
    redis_client.hset(f"{base}:m:int2", "group", "32")  # as KIVI entries were written before 2026-12-03
    fp16, int8, int2 = bank.get(["fp16", "int8", "int2"])
    assert torch.equal(fp16, memory.half().float())
    assert torch.allclose(int8, memory, atol=float(scale.float().max()) / 2 + 1e-6)
    assert int2.shape == (3, 2, 2, 8, 64)
    assert redis_client.hget(f"{base}:m:int2", "storage") == b"int2"
    assert np.frombuffer(redis_client.hget(f"{base}:m:int2", "memory"), np.uint8).size == 3 * 2 * 2 * 8 * 64 * 2 // 8
