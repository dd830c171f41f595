"""``mac`` / ``mac_rag`` in the evaluation harness on tiny models, built from a saved artifact."""

from __future__ import annotations

import pytest
import torch

from tests.mac_helpers import TINY_MAC, tiny_encoder, tiny_mac
from training.data.evalset import EvalSet
from training.harness import ProtocolConfig, run_method
from training.mac.method import MACMethod, MACMethodSettings
from training.mac.model import save_mac
from training.memory_bank import InMemoryMemoryBank
from training.methods import MethodConfig, MethodContext, build_method
from training.types import Document, Question

DOCS = [
    Document("d0", "The council approved the new harbour bridge on Tuesday."),
    Document("d1", "In 2031 the city of Norvale opened 12 libraries and 3 museums."),
    Document("d2", "Scientists at the Aurora Institute reported a record harvest of kelp."),
]
QUESTIONS = [
    Question("q0", "Who approved the bridge?", ("the council",), ("d0",)),
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
                          mac_group_size=2)
    return MethodContext(base, tok, config), mac


@pytest.mark.parametrize("name", ["mac", "mac_rag"])
def test_harness_runs_mac_methods_from_an_artifact(ctx_and_artifact, name):
    ctx, _ = ctx_and_artifact
    method = build_method(name, ctx)
    assert method.name == name
    run = run_method(method, EvalSet("tiny", "test", DOCS, QUESTIONS), ProtocolConfig(latency_samples=2),
                     progress=False)
    assert 0 <= run.f1 <= 100 and run.accuracy is not None and len(run.predictions) == 2
    # one entry per document: n_tokens x hidden fp16 + a fp16 key (chunk_tokens fits each document)
    assert run.memory_bytes_per_doc == TINY_MAC.n_tokens * 64 * 2 + 32 * 2


def test_top_k_reads_only_k_entries_and_delete_forgets(ctx_and_artifact):
    ctx, mac = ctx_and_artifact
    fetched = []

    class SpyBank(InMemoryMemoryBank):
        def get(self, doc_ids):
            fetched.extend(doc_ids)
            return super().get(doc_ids)

    method = MACMethod(ctx, mac.eval(), MACMethodSettings(top_k=1, group_size=2), bank=SpyBank())
    for doc in DOCS:
        method.ingest(doc)
    before = method.prefixes([QUESTIONS[0]])
    assert len(fetched) == 1
    full = MACMethod(ctx, mac, MACMethodSettings(group_size=2), bank=InMemoryMemoryBank())
    for doc in DOCS:
        full.ingest(doc)
    full_before = full.prefixes([QUESTIONS[0]])[0][0]
    assert full.delete("d0") and "d0" not in full.bank and full.stored_bytes() < 3 * (TINY_MAC.n_tokens * 64 * 2 + 64)
    assert not torch.allclose(full.prefixes([QUESTIONS[0]])[0][0], full_before)
    assert before[0][0].shape == full_before.shape
