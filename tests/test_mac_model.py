"""MAC end to end on tiny models: what trains, backprop dropout, artifacts, exact deletion."""

from __future__ import annotations

import pytest
import torch

from tests.mac_helpers import TINY_MAC, tiny_encoder, tiny_mac
from training.artifacts import ArtifactError
from training.mac.aggregator import iter_bank_entries, stack_memories
from training.mac.config import MACConfig
from training.mac.model import MAC, answer_nll, load_mac, prompt_head, qa_batch, save_mac
from training.mac.runtime import MacReadConfig, MacRuntime
from training.mac.train import mac_loss
from training.memory import InMemoryMemoryBank
from training.models import tiny_causal_lm

DOCS = [
    "The council approved the new harbour bridge on Tuesday.",
    "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
    "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp.",
]


QUESTIONS = ["Who approved the bridge?", "How many libraries opened?", "What was harvested?"]
ANSWERS = ["the council", "12", "kelp"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_reach_only_the_memory_tokens(kind):
    mac, base, tok = tiny_mac(kind)
    head = prompt_head(base, tok)
    mac.train()
    assert [n for n, p in mac.named_parameters() if p.requires_grad] == ["amortizer.memory_tokens"]
    loss = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, backprop_mask=[True, True, True], head=head)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    grad = mac.amortizer.memory_tokens.grad
    assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all()
    assert all(p.grad is None for p in mac.encoder.parameters())  # frozen encoder
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())  # frozen base model
    assert not mac.encoder.training  # train() keeps the encoder in eval mode
    assert set(mac.trainable_tensors()) == {"amortizer.memory_tokens"}


def test_each_question_reads_its_own_entry_and_the_next_ones():
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize(base, tok, head, DOCS)]
        ids, attn, labels = qa_batch(tok, QUESTIONS, ANSWERS, head=head)
        for k in (1, 2, 3):
            reads = [[entries[(i + j) % 3] for j in range(k)] for i in range(3)]
            memory, mask = stack_memories(reads, base.device)
            expected = answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask,
                                  start=mac.start(head)).mean()
            got = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, [True] * 3, head=head, entries_per_question=k)
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        wrong = [[entries[(i + 1) % 3]] for i in range(3)]
        memory, mask = stack_memories(wrong, base.device)
        other = answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask, start=mac.start(head)).mean()
        own = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, [True] * 3, head=head)
    assert abs(other.item() - own.item()) > 1e-6


def test_backprop_dropout_changes_the_gradient_not_the_loss():
    """Documents outside the backprop mask are memorized without autograd: the same loss, but only
    the kept documents' memory tokens carry gradient, so the gradients of one-document masks add
    up to the full one (none kept: no gradient path at all)."""
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    masks = [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
    for k in (1, 3):
        grads, losses = {}, {}
        for mask in masks:
            mac.zero_grad(set_to_none=True)
            loss = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, list(mask), head=head, entries_per_question=k)
            loss.backward()
            grads[mask], losses[mask] = mac.amortizer.memory_tokens.grad.clone(), loss.item()
        assert max(losses.values()) - min(losses.values()) < 1e-6
        singles = [grads[m] for m in masks[1:]]
        assert all(g.abs().sum() > 0 for g in singles)
        assert not torch.allclose(singles[0], grads[masks[0]])
        torch.testing.assert_close(sum(singles), grads[masks[0]], atol=1e-7, rtol=1e-4)
        none = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, [False] * 3, head=head, entries_per_question=k)
        assert not none.requires_grad


def test_a_few_steps_fit_a_fixed_batch():
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    opt = torch.optim.Adam([p for p in mac.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(12):
        loss = mac_loss(mac, base, tok, DOCS, QUESTIONS, ANSWERS, [True] * 3, head=head)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # a random tiny base is near-uniform (NLL ~ log 384) and its memory tokens only steer it a
    # little; still every step must lower the NLL, by much more than float noise in total
    assert all(after < before for before, after in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 0.01


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_artifact_round_trip_and_base_mismatch(tmp_path, kind):
    mac, base, tok = tiny_mac(kind)
    head = prompt_head(base, tok)
    save_mac(tmp_path / "mac", mac, base_model=f"tiny-{kind}", base_config=base.config, encoder="tiny",
             metrics={"f1": 1.0})
    loaded, manifest = load_mac(tmp_path / "mac", base.config, encoder=tiny_encoder())
    assert manifest.kind == "mac" and manifest.config["mac"] == TINY_MAC.model_dump()
    assert manifest.config["encoder"] == "tiny" and manifest.metrics == {"f1": 1.0}
    assert loaded.config == TINY_MAC and not loaded.training
    torch.testing.assert_close(loaded.amortizer.memory_tokens, mac.amortizer.memory_tokens)
    with torch.no_grad():
        for (e1, k1), (e2, k2) in zip(mac.memorize(base, tok, head, DOCS), loaded.memorize(base, tok, head, DOCS)):
            torch.testing.assert_close(e1, e2)
            torch.testing.assert_close(k1, k2)
    other, _ = tiny_causal_lm(kind, hidden_size=32)
    with pytest.raises(ArtifactError, match="base model"):
        load_mac(tmp_path / "mac", other.config, encoder=tiny_encoder())


def test_an_artifact_of_another_architecture_is_refused(tmp_path):
    from training.artifacts import save_artifact

    mac, base, _ = tiny_mac()
    save_artifact(tmp_path / "old", kind="mac", tensors={"amortizer.queries": torch.zeros(4, 32)},
                  base_model="tiny-llama", base_config=base.config, config={"mac": TINY_MAC.model_dump(), "encoder": "tiny"})
    with pytest.raises(ValueError, match="do not match the architecture"):
        load_mac(tmp_path / "old", base.config, encoder=tiny_encoder())


def test_deleting_an_entry_removes_its_influence_exactly():
    """After deleting a document, the answer distribution for a question only it supports
    changes, and equals the one of a bank that never held the document."""
    mac, base, tok = tiny_mac()
    mac.eval()
    head = prompt_head(base, tok)
    question, answer = "Who approved the new harbour bridge?", "the council"
    full, without = InMemoryMemoryBank(), InMemoryMemoryBank()
    with torch.no_grad():
        for i, (memory, key) in enumerate(mac.memorize(base, tok, head, DOCS)):
            full.put(f"d{i}", memory, key)
            if i != 0:
                without.put(f"d{i}", memory, key)

        def answer_nll_from(bank):
            memory, mask = stack_memories([list(iter_bank_entries(bank, bank.ids()))], base.device)
            ids, attn, labels = qa_batch(tok, [question], [answer], head=head)
            return answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask, start=mac.start(head))

        before = answer_nll_from(full)
        assert full.delete("d0") and "d0" not in full
        after = answer_nll_from(full)
        assert abs(before.item() - after.item()) > 1e-6  # a random tiny model is near-uniform: small but real
        torch.testing.assert_close(after, answer_nll_from(without), atol=0, rtol=0)
        # generation runs on the bank after deletion too, and reads none of the deleted entry
        runtime = MacRuntime(mac, base, tok, full, MacReadConfig(top_k=None))
        ((answer_text, read),) = runtime.answer(base, [question], max_new_tokens=3)
        assert isinstance(answer_text, str) and "d0" not in read and sorted(read) == ["d1", "d2"]


def test_runtime_reads_each_question_s_nearest_entries_by_key():
    mac, base, tok = tiny_mac()
    runtime = MacRuntime(mac, base, tok, InMemoryMemoryBank(), MacReadConfig(top_k=2))
    runtime.memorize([f"d{i}" for i in range(len(DOCS))], DOCS)
    questions = ["Who approved the bridge?", "How many libraries opened?"]
    _, mask, read = runtime.read(questions, base.device)
    ids, keys = runtime.bank.keys()
    for question, chosen in zip(mac.keys(questions), read):
        assert chosen == [ids[i] for i in torch.topk(keys @ question, 2).indices.tolist()]
    answers = runtime.answer(base, questions, max_new_tokens=4)
    assert [r for _, r in answers] == read and all(isinstance(a, str) for a, _ in answers)


@pytest.mark.real_model
def test_smollm2_answer_from_memory_is_gone_after_deleting_its_document():
    """Acceptance 4 on the real models: a fact only one document holds is answered from memory,
    and not any more once that document's entry is deleted."""
    from training.models import load_causal_lm, load_encoder

    base, tok = load_causal_lm()
    base.requires_grad_(False)
    encoder, enc_tok = load_encoder()
    mac = MAC(MACConfig(), encoder, enc_tok, base.config).eval()
    mac.amortizer.init_memory_tokens(base)
    runtime = MacRuntime(mac, base, tok, InMemoryMemoryBank(), MacReadConfig(top_k=1))
    runtime.memorize(["norvale", "bridge"], ["In 2031 the city of Norvale opened 12 libraries and 3 museums.",
                                             "The council of Eastport approved the new harbour bridge on Tuesday."])

    def ask() -> str:
        return runtime.answer(base, ["How many libraries did Norvale open in 2031?"], max_new_tokens=16)[0][0]

    assert "12" in ask()
    assert runtime.delete("norvale")
    assert "12" not in ask()
