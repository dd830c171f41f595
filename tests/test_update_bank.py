"""The per-document update bank on tiny random models: entries, exact deletion, per-request
application, and the harness method."""

from __future__ import annotations

import pytest
import torch

from training.eval.harness import ProtocolConfig, run_method
from training.data.evalset import EvalSet
from training.lora import LoraSpec
from training.memory import InMemoryMemoryBank, RedisMemoryBank
from training.meta_ft.adapter import MetaAdapterConfig
from training.methods import MethodConfig, MethodContext, build_method
from training.mac.aggregator import entry_ids
from training.models import embed_texts, tiny_causal_lm
from training.retrieval import BM25Index
from training.retrievers import rrf_fuse
from training.types import Document, Question
from training.update_bank.runtime import DeltaLayout, UpdateBankConfig, UpdateBankRuntime
from training.updates import LoraUpdater, UpdateConfig, uniform_weights

from tests.mac_helpers import tiny_encoder
from tests.meta_fixtures import FACTS, write_tiny_meta_init

DOCS = [Document(f"d{i}", text) for i, (_, text, _) in enumerate(FACTS[:4])]
PROMPT = "Question: How many libraries did Norvale open?"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoder")
    encoder, tokenizer = tiny_encoder()
    encoder.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _trained_init(updater: LoraUpdater) -> None:
    """A meta-trained init is not the identity: B != 0, so one step moves A and B."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in updater.params:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _runtime(encoder_dir, trained: bool, top_k: int = 1, storage: str = "float16", key: str = "dense",
             bank=None) -> UpdateBankRuntime:
    from training.models import load_encoder

    base, tok = tiny_causal_lm("llama")
    config = UpdateConfig(optimizer="sgd", lr=0.5, lora=LoraSpec(rank=2, targets=["q_proj", "v_proj", "down_proj"]))
    updater = LoraUpdater(base, tok, uniform_weights(tok, config.max_tokens), config)
    if trained:
        _trained_init(updater)
    encoder, enc_tok = load_encoder(str(encoder_dir))
    return UpdateBankRuntime(updater, encoder, enc_tok, bank if bank is not None else InMemoryMemoryBank(storage),
                             UpdateBankConfig(encoder=str(encoder_dir), top_k=top_k, storage=storage, slots=3, key=key))


def _logits(model, adapter_names=None):
    ids = torch.tensor([[5, 17, 42, 9, 77, 31]])
    kwargs = {} if adapter_names is None else {"adapter_names": adapter_names * ids.shape[0]}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_on_redis_questions_select_through_the_key_index_without_reading_every_key(encoder_dir, redis_client):
    """The bank on Redis (as the service would keep it) selects what the in-memory bank selects,
    and after the index is loaded a question reads no key list from Redis (``SMEMBERS``: what
    ``bank.keys()`` starts with), only its candidates' keys."""
    in_memory = _runtime(encoder_dir, True)
    on_redis = _runtime(encoder_dir, True, bank=RedisMemoryBank(redis_client, bank="updates"))
    for runtime in (in_memory, on_redis):
        assert runtime.memorize([d.id for d in DOCS], [d.text for d in DOCS]) == len(DOCS)
    questions = [PROMPT] + [qas[0][0] for _, _, qas in FACTS[:4]]
    expected = in_memory.read(questions)
    assert on_redis.read(questions[:1]) == expected[:1]  # loads the index
    before = redis_client.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0)
    assert on_redis.read(questions) == expected
    assert redis_client.info("commandstats").get("cmdstat_smembers", {}).get("calls", 0) == before


@pytest.mark.parametrize("trained", [False, True])
def test_entries_hold_each_documents_own_step_and_delete_exactly(encoder_dir, trained):
    runtime = _runtime(encoder_dir, trained)
    init = runtime.updater.adapter_tensors()
    # from a fresh adapter (B = 0) one step moves B only: the entry holds half the tensors
    assert all(("lora_B" in n) for n in runtime.layout.names) != trained
    assert runtime.memorize([d.id for d in DOCS], [d.text for d in DOCS]) == len(DOCS)
    assert runtime.updater.adapter_tensors().keys() == init.keys()
    assert all(torch.equal(runtime.updater.adapter_tensors()[n], init[n]) for n in init)  # reset after each step

    reference = _runtime(encoder_dir, trained).updater  # the same init, stepped on one document
    start = reference.snapshot()
    for doc, entry in zip(DOCS, runtime.bank.get([d.id for d in DOCS])):
        reference.restore(start)
        reference.step(doc.text)
        moved = reference.adapter_tensors()
        delta = runtime.layout.unpack(entry)
        for name in init:
            expected = moved[name] - init[name]
            if name in delta:
                torch.testing.assert_close(delta[name], expected, rtol=2e-3, atol=1e-6)  # fp16 storage
            else:
                assert not expected.any()  # what the layout leaves out really does not move
        assert max(d.abs().max().item() for d in delta.values()) > 0

    bytes_before, bytes_d1 = runtime.stored_bytes(), runtime.bank.nbytes("d1")
    assert bytes_before == sum(runtime.bank.nbytes(d.id) for d in DOCS) and bytes_d1 > 0
    assert runtime.delete("d1") and not runtime.delete("d1")
    assert "d1" not in runtime.bank and runtime.bank.get(["d1"]) == [None]
    assert "d1" not in sum(runtime.read([PROMPT, FACTS[1][1]]), [])  # no question can select it any more
    assert runtime.stored_bytes() == bytes_before - bytes_d1
    kept = {d: e.clone() for d, e in zip(["d0", "d2"], runtime.bank.get(["d0", "d2"]))}
    assert runtime.rebuild([d.id for d in DOCS], [d.text for d in DOCS]) == len(DOCS)
    for doc_id, entry in zip(["d0", "d2"], runtime.bank.get(["d0", "d2"])):
        torch.testing.assert_close(entry, kept[doc_id])  # rebuilt from the documents alone: the same entries


@pytest.mark.parametrize("trained", [False, True])
def test_a_request_runs_with_its_documents_step_and_nothing_else(encoder_dir, trained):
    """Per-request adapters: a row asked with document d's entry == the model right after one step
    from the init on d alone (meta_ft_isolated); rows of one batch use different documents."""
    runtime = _runtime(encoder_dir, trained)
    runtime.memorize([d.id for d in DOCS], [d.text for d in DOCS])
    names = runtime._load([["d0"], ["d2"], []])
    assert names[2] == runtime.updater.adapter_name and names[0] != names[1]
    ids = torch.tensor([[5, 17, 42, 9, 77, 31]] * 3)
    with torch.no_grad():
        mixed = runtime.model(input_ids=ids, adapter_names=names).logits
    init_logits = _logits(runtime.model)
    reference = _runtime(encoder_dir, trained).updater
    start = reference.snapshot()
    for row, doc in ((0, DOCS[0]), (1, DOCS[2])):
        reference.restore(start)
        reference.step(doc.text)
        torch.testing.assert_close(mixed[row : row + 1], _logits(reference.model), rtol=1e-3, atol=1e-4)
        assert not torch.allclose(mixed[row : row + 1], init_logits, atol=1e-4)  # the step changed something
    torch.testing.assert_close(mixed[2:3], init_logits)


def test_hybrid_keys_fuse_bm25_over_the_entries_documents_with_their_keys(encoder_dir):
    runtime = _runtime(encoder_dir, False, top_k=2, key="hybrid")
    runtime.memorize([d.id for d in DOCS], [d.text for d in DOCS])
    questions = [q for _, _, qas in FACTS[:4] for q, _ in qas]
    keys = embed_texts(runtime.encoder, runtime.encoder_tokenizer, questions, runtime.config.key_tokens)
    lexical_index = BM25Index(DOCS, max_words=1000)
    for question, key, read in zip(questions, keys, runtime.read(questions)):
        dense = entry_ids(runtime.bank, key, len(DOCS))
        lexical = [hit.doc_id for hit in lexical_index.search(question, len(DOCS))]
        assert read == [doc_id for doc_id, _ in rrf_fuse([lexical, dense])[:2]]
    own_text = DOCS[1].text  # first in both rankings
    assert runtime.read([own_text])[0][0] == "d1"
    runtime.delete("d1")  # gone from both rankings: no question can select it
    assert "d1" not in runtime.read([own_text])[0]
    runtime.rebuild([d.id for d in DOCS], [d.text for d in DOCS])
    assert runtime.read([own_text])[0][0] == "d1" and len(runtime._lexical) == len(DOCS)


def test_top_k_entries_add_their_deltas_over_a_trained_init(encoder_dir):
    runtime = _runtime(encoder_dir, trained=True, top_k=2)
    runtime.memorize([d.id for d in DOCS[:2]], [d.text for d in DOCS[:2]])
    (name,) = runtime._load([["d0", "d1"]])
    init = runtime.init
    deltas = [runtime.layout.unpack(e) for e in runtime.bank.get(["d0", "d1"])]
    peft = runtime.model
    for module_name, module in peft.named_modules():
        if not hasattr(module, "lora_A") or name not in module.lora_A:
            continue
        key = module_name + ".lora_{}.weight"
        a0, b0 = init[key.format("A")], init[key.format("B")]
        expected = b0 @ a0 + sum((b0 + d[key.format("B")]) @ (a0 + d[key.format("A")]) - b0 @ a0 for d in deltas)
        got = module.lora_B[name].weight @ module.lora_A[name].weight
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert module.scaling[name] == module.scaling[runtime.updater.adapter_name]


def test_int8_entries_are_about_half_the_bytes(encoder_dir):
    half = _runtime(encoder_dir, trained=True)
    quarter = _runtime(encoder_dir, trained=True, storage="int8")
    for runtime in (half, quarter):
        runtime.memorize(["d0"], [DOCS[0].text])
    ratio = quarter.stored_bytes() / half.stored_bytes()
    assert 0.45 < ratio < 0.6
    layout = DeltaLayout.of(half.init, 1)
    assert half.bank.nbytes("d0") >= 2 * layout.numel  # fp16 values (+ the key)


def test_update_bank_in_the_harness(encoder_dir, tmp_path):
    write_tiny_meta_init(tmp_path / "m", MetaAdapterConfig(variant="lora", rank=2, top_layers=1, inner_lr=0.3))
    base, tok = tiny_causal_lm("llama")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=3, meta_ft_artifact=str(tmp_path / "m"),
                                                update_bank=UpdateBankConfig(encoder=str(encoder_dir), slots=2)))
    questions = [Question("q0", FACTS[0][2][0][0], (FACTS[0][2][0][1],), ("d0",), choices=("12", "3"), answer_index=0),
                 Question("q1", FACTS[2][2][0][0], (FACTS[2][2][0][1],), ("d2",)),
                 Question("q2", FACTS[3][2][0][0], (FACTS[3][2][0][1],), ("d3",))]
    method = build_method("update_bank", ctx)
    assert method.runtime.updater.config.optimizer == "sgd" and method.runtime.updater.config.lr == 0.3
    run = run_method(method, EvalSet("tiny", "test", DOCS, questions), ProtocolConfig(latency_samples=2), progress=False)
    assert run.extra["entries"] == len(DOCS)
    assert run.memory_bytes_per_doc > 0 and run.accuracy is not None and 0.0 <= run.f1 <= 100.0
    for name, p in base.named_parameters():  # closed: the base model is handed back unchanged
        torch.testing.assert_close(p, before[name])


@pytest.mark.parametrize("updater", ["uniform", "meta"])
def test_the_lr_chosen_on_val_drives_every_updater_of_the_bank(encoder_dir, tmp_path, updater):
    """``--meta-ft-lr-grid`` sets the bank's step size whoever takes the step (it once reached only
    meta-trained inits: a grid over ``uniform`` measured one lr four times)."""
    write_tiny_meta_init(tmp_path / "meta", MetaAdapterConfig(variant="lora", rank=2, top_layers=1, inner_lr=0.3))
    base, tok = tiny_causal_lm("llama")
    spec = "uniform" if updater == "uniform" else str(tmp_path / "meta")
    for lr in (None, 0.02):
        ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=3, meta_ft_lr=lr, update_bank=UpdateBankConfig(
            encoder=str(encoder_dir), slots=1, updater=spec)))
        method = build_method("update_bank", ctx)
        default = MethodConfig().ft_lr if updater == "uniform" else 0.3
        assert method.runtime.updater.config.lr == (default if lr is None else lr)
        method.close()
