"""``mac`` / ``mac_rag`` in the evaluation harness on tiny models, built from a saved artifact."""

from __future__ import annotations

import pytest
import torch

from tests.mac_helpers import TINY_MAC, expected_slots, tiny_encoder, tiny_mac
from training.data.evalset import EvalSet
from training.eval.harness import ProtocolConfig, run_method
from training.mac.aggregator import stack_memories
from training.mac.method import MACMethod
from training.mac.model import prompt_head, save_mac
from training.mac.runtime import MacReadConfig, MacRuntime
from training.mac.prefix import kv_geometry
from training.memory import InMemoryMemoryBank, encode_entry
from training.methods import MethodConfig, MethodContext, build_method
from training.types import Document, Question

DOCS = [
    Document("d0", "The council approved the new harbour bridge on Tuesday."),
    Document("d1", "In 2031 the city of Norvale opened 12 libraries and 3 museums."),
    Document("d2", "Scientists at the Aurora Institute reported a record harvest of kelp."),
]
QUESTIONS = [
    Question("q0", "Who approved the bridge?", ("the council",), ("d0",), choices=("the council", "the mayor", "kelp"),
             answer_index=0),
    Question("q1", "How many libraries opened?", ("12",), ("d1",), choices=("12", "3", "7"), answer_index=0),
]


@pytest.fixture
def ctx_and_artifact(tmp_path):
    mac, base, tok = tiny_mac()
    encoder, enc_tok = tiny_encoder()
    encoder.save_pretrained(tmp_path / "encoder")
    enc_tok.save_pretrained(tmp_path / "encoder")
    save_mac(tmp_path / "mac", mac, base_model="tiny-llama", base_config=base.config,
             encoder=str(tmp_path / "encoder"))
    config = MethodConfig(max_new_tokens=4, batch_size=2, rag_k=1, mac_artifact=str(tmp_path / "mac"),
                          mac=MacReadConfig(group_size=2))
    return MethodContext(base, tok, config), mac.eval()


def _entry_bytes(ctx, text, storage="float16"):
    """Slots [layers, 2, kv_heads, slots, head_dim] in ``storage`` (fp16: 2 bytes a value) plus a fp16 retrieval key."""
    layers, kv_heads, head_dim = kv_geometry(ctx.model.config)
    slots = expected_slots(TINY_MAC, ctx.tokenizer, prompt_head(ctx.model, ctx.tokenizer), text)
    if storage == "float16":
        return (layers * 2 * kv_heads * slots * head_dim + 32) * 2
    return encode_entry(torch.zeros(layers, 2, kv_heads, slots, head_dim), storage).nbytes() + 32 * 2


def _ingested(ctx, mac, settings, docs=DOCS, rag=False):
    method = MACMethod(ctx, MacRuntime(mac, ctx.model, ctx.tokenizer, InMemoryMemoryBank(), settings), rag=rag)
    for doc in docs:
        method.ingest(doc)
    return method


def _memory(method, questions):
    memory, mask, _ = method.runtime.read([q.question for q in questions], method.ctx.model.device)
    return memory, mask


@pytest.mark.parametrize("name", ["mac", "mac_rag"])
def test_harness_runs_mac_methods_from_an_artifact(ctx_and_artifact, name):
    ctx, mac = ctx_and_artifact
    method = build_method(name, ctx)
    assert method.name == name and method.runtime.mac is not mac  # loaded from the artifact
    torch.testing.assert_close(method.runtime.mac.amortizer.memory_tokens, mac.amortizer.memory_tokens)
    run = run_method(method, EvalSet("tiny", "test", DOCS, QUESTIONS), ProtocolConfig(latency_samples=2),
                     progress=False)
    assert 0 <= run.f1 <= 100 and run.accuracy is not None and len(run.predictions) == 2
    assert ctx.config.mac.storage == "int4"  # the default: KIVI int4
    expected = sum(_entry_bytes(ctx, d.text, "int4") for d in DOCS) / len(DOCS)
    assert run.memory_bytes_per_doc == pytest.approx(expected)
    assert expected < 0.5 * sum(_entry_bytes(ctx, d.text) for d in DOCS) / len(DOCS)  # tiny entries: scales weigh more


def test_int8_storage_halves_the_bytes_per_document(ctx_and_artifact):
    """``mac_storage="int8"``: one byte per value plus one fp16 scale per head_dim-long slot vector."""
    ctx, _ = ctx_and_artifact
    int8 = MethodContext(ctx.model, ctx.tokenizer,
                         ctx.config.model_copy(update={"mac": MacReadConfig(group_size=2, storage="int8")}))
    method = build_method("mac", int8)
    assert method.runtime.bank.storage == "int8"
    run = run_method(method, EvalSet("tiny", "test", DOCS, QUESTIONS), ProtocolConfig(latency_samples=2),
                     progress=False)
    _, _, head_dim = kv_geometry(ctx.model.config)
    fp16 = sum(_entry_bytes(ctx, d.text) for d in DOCS) / len(DOCS)
    values = (fp16 - 32 * 2) / 2  # the fp16 entry's values, without the key
    assert run.memory_bytes_per_doc == pytest.approx(values + values / head_dim * 2 + 32 * 2)
    assert 0 <= run.f1 <= 100 and len(run.predictions) == 2


def test_top_k_reads_only_the_nearest_entry(ctx_and_artifact):
    ctx, mac = ctx_and_artifact
    method = _ingested(ctx, mac, MacReadConfig(top_k=1, group_size=2))
    bank = method.runtime.bank
    memory, mask = _memory(method, [QUESTIONS[0]])
    entries = dict(zip(bank.ids(), bank.get(bank.ids())))
    key = mac.keys([QUESTIONS[0].question])[0]
    ids, keys = bank.keys()
    nearest = ids[int((keys @ key).argmax())]
    expected, expected_mask = stack_memories([[entries[nearest]]], ctx.model.device)
    assert mask.tolist() == expected_mask.tolist()
    for (k, v), (ek, ev) in zip(memory, expected):
        torch.testing.assert_close(k, ek)
        torch.testing.assert_close(v, ev)
    _, all_mask = _memory(_ingested(ctx, mac, MacReadConfig(top_k=None, group_size=2)), [QUESTIONS[0]])
    assert all_mask.sum() == sum(e.shape[3] for e in entries.values()) > mask.sum()


def test_group_size_only_changes_how_entries_are_read(ctx_and_artifact):
    ctx, mac = ctx_and_artifact
    results = [_memory(_ingested(ctx, mac, MacReadConfig(top_k=None, group_size=g)), QUESTIONS) for g in (1, 2, 16)]
    for memory, mask in results[1:]:
        assert torch.equal(mask, results[0][1])
        for (k, v), (k0, v0) in zip(memory, results[0][0]):
            assert torch.equal(k, k0) and torch.equal(v, v0)


def test_deleting_a_document_removes_its_influence_exactly(ctx_and_artifact):
    """Scores of a question only d0 supports change when d0 is deleted, and equal those of a
    method that never ingested it."""
    ctx, mac = ctx_and_artifact
    full = _ingested(ctx, mac, MacReadConfig(top_k=None, group_size=2))
    never = _ingested(ctx, mac, MacReadConfig(top_k=None, group_size=2), DOCS[1:])
    before_bytes = full.stored_bytes()
    before = full.choice_scores(QUESTIONS[0])
    assert full.delete("d0") and "d0" not in full.runtime.bank and not full.delete("d0")
    after = full.choice_scores(QUESTIONS[0])
    assert len(before) == 3 and max(abs(a - b) for a, b in zip(before, after)) > 1e-6
    assert after == never.choice_scores(QUESTIONS[0])
    assert before_bytes - full.stored_bytes() == _entry_bytes(ctx, DOCS[0].text)
    assert full.answer(QUESTIONS) == never.answer(QUESTIONS)
    full.close()
    assert len(full.runtime.bank) == 0 and full.stored_bytes() == 0


def test_mac_rag_puts_the_best_passage_in_the_prompt(ctx_and_artifact):
    ctx, mac = ctx_and_artifact
    rag = _ingested(ctx, mac, MacReadConfig(group_size=2), rag=True)
    plain = _ingested(ctx, mac, MacReadConfig(group_size=2))
    assert rag.name == "mac_rag" and rag._passages(QUESTIONS[1]) == [DOCS[1].text]
    assert plain._passages(QUESTIONS[1]) is None
    assert rag.choice_scores(QUESTIONS[1]) != plain.choice_scores(QUESTIONS[1])
    rag.delete("d1")
    assert DOCS[1].text not in (rag._passages(QUESTIONS[1]) or [])


def test_mac_read_methods_share_one_write_per_document(ctx_and_artifact):
    """``mac_read:<settings>``: each document is written once per process; every method stores that
    entry with its own storage and reads it with its own settings."""
    ctx, mac = ctx_and_artifact
    plain = _ingested(ctx, mac, MacReadConfig(top_k=1))
    fp16 = build_method("mac_read:float16-k1", ctx)
    int4 = build_method("mac_read:int4-k2-rot", ctx)
    assert int4.runtime.config == MacReadConfig(group_size=2, storage="int4", top_k=2, rerotate=True)
    for method in (fp16, int4):
        for doc in DOCS:
            method.ingest(doc)
    ids = plain.runtime.bank.ids()
    for a, b, c in zip(plain.runtime.bank.get(ids), fp16.runtime.bank.get(ids), int4.runtime.bank.get(ids)):
        torch.testing.assert_close(a, b)  # the same write
        assert not torch.equal(b, c) and torch.allclose(b, c, atol=(b.abs().max() / 7).item())  # int4: within a step
    assert fp16.answer(QUESTIONS) == plain.answer(QUESTIONS)
    assert len(int4.answer(QUESTIONS)) == 2


def test_fewer_doc_slots_keep_the_highest_scoring_subset_of_the_same_write(ctx_and_artifact):
    """``mac_read:...-s<N>`` (``MacReadConfig.doc_slots``): an entry keeps N document slots per chunk,
    the N best heavy hitters of the same forward pass, and the same memory tokens, so entries shrink
    from the same weights; each slot count is a write of its own."""
    ctx, mac = ctx_and_artifact
    full, few = build_method("mac_read:float16", ctx), build_method("mac_read:float16-s3", ctx)
    doc = DOCS[1]
    full.ingest(doc), few.ingest(doc)
    (a,), (b,) = full.runtime.bank.get([doc.id]), few.runtime.bank.get([doc.id])
    head = prompt_head(ctx.model, ctx.tokenizer)
    assert b.shape[3] == expected_slots(TINY_MAC.model_copy(update={"doc_slots": 3}), ctx.tokenizer, head, doc.text)
    assert a.shape[3] == expected_slots(TINY_MAC, ctx.tokenizer, head, doc.text) > b.shape[3]
    memory = TINY_MAC.memory_tokens
    torch.testing.assert_close(a[..., -memory:, :], b[..., -memory:, :])  # one chunk: its memory tokens last
    kept, chosen = a[..., :-memory, :], b[..., :-memory, :]
    matches = (chosen.unsqueeze(4) - kept.unsqueeze(3)).abs().amax(-1) < 1e-6  # [layers, 2, heads, 3, 8]
    assert matches.any(-1).all()  # every kept slot is one of the full entry's
    assert len(few.answer(QUESTIONS)) == 2
    assert few.stored_bytes() < full.stored_bytes()


def test_size_curve_bytes_and_settings_of_each_mac_row():
    """``training.mac.size_curve``: a chunk's bytes are its encoded entry's (SmolLM2's geometry: the
    figures of docs/BENCHMARKS.md), and each row's settings come from its name over the run's."""
    from training.mac.size_curve import chunk_bytes, read_settings

    smollm2 = (30, 3, 64)
    assert chunk_bytes(*smollm2, 56, "float16") == 1_290_240
    assert chunk_bytes(*smollm2, 56, "int2") == 247_680
    assert chunk_bytes(*smollm2, 28, "int2") < 128 * 1024 < chunk_bytes(*smollm2, 32, "int2")
    run = {"methods": {"mac": MacReadConfig(storage="int8").model_dump()}}
    assert read_settings("mac", run) == MacReadConfig(storage="int8")
    assert read_settings("mac_read:int2-s20-k3-rot", run) == MacReadConfig(storage="int2", doc_slots=20, top_k=3,
                                                                            rerotate=True)
    assert read_settings("rag_dense", run) is None
    assert chunk_bytes(*smollm2, 56, "k3v2") == 244_800 <= 256_000 < chunk_bytes(*smollm2, 56, "k4v2") == 285_120
    assert read_settings("mac_read:k3v2-k1", run) == MacReadConfig(storage="k3v2", top_k=1)


def test_storage_probe_reads_a_kivi_spec_as_the_storage_of_the_same_settings():
    """``training.mac.storage_probe``: ``k3v2-g64/64-clip`` is the bank's ``k3v2`` bit for bit (so val
    probes of unnamed specs compare with the shipped storages), and a bad spec fails up front."""
    from training.mac.storage_probe import store_and_read

    entry = torch.randn(2, 2, 3, 56, 64)
    (named, named_bytes), (spec, spec_bytes) = store_and_read("k3v2"), store_and_read("k3v2-g64/64-clip")
    assert torch.equal(named(entry), spec(entry)) and named_bytes(entry.shape) == spec_bytes(entry.shape)
    unclipped, _ = store_and_read("k3v2-g64/64")
    assert ((unclipped(entry) - entry) ** 2).sum() > ((spec(entry) - entry) ** 2).sum()
    assert torch.equal(store_and_read("k2v2")[0](entry), store_and_read("int2")[0](entry))  # groups of 32 by default
    with pytest.raises(ValueError, match="k<bits>v<bits>"):
        store_and_read("k3")
