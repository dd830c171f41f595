"""Reading many memory entries: per-question entries side by side (padded and masked), top-k
pre-selection by retrieval key, entries streamed out of a bank."""

from __future__ import annotations

import pytest
import torch

from tests.mac_helpers import tiny_mac
from training.mac.aggregator import iter_bank_entries, select_top_k, stack_memories
from training.mac.model import answer_nll, prompt_head, qa_batch
from training.mac.prefix import prefixed_forward
from training.memory import InMemoryMemoryBank

DOCS = [
    "The council approved the new harbour bridge on Tuesday.",
    "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
    "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp.",
]


def _entry(n, seed, layers=2, kv_heads=2, head_dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, kv_heads, n, head_dim, generator=g)


def test_stack_memories_pads_and_masks_per_question():
    a, b, c = _entry(3, 0), _entry(5, 1), _entry(2, 2)
    memory, mask = stack_memories([[a], [b, c], []], "cpu")
    assert len(memory) == 2 and memory[0][0].shape == (3, 2, 7, 4)
    assert mask.tolist() == [[1] * 3 + [0] * 4, [1] * 7, [0] * 7]
    for layer, (k, v) in enumerate(memory):
        torch.testing.assert_close(k[0, :, :3], a[layer, 0])
        torch.testing.assert_close(v[0, :, :3], a[layer, 1])
        torch.testing.assert_close(k[1], torch.cat([b[layer, 0], c[layer, 0]], 1))
        torch.testing.assert_close(v[1], torch.cat([b[layer, 1], c[layer, 1]], 1))
        assert k[0, :, 3:].abs().sum() == 0 and k[2].abs().sum() == 0
    assert stack_memories([[], []], "cpu") == (None, None)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_questions_with_different_entry_counts_read_like_one_at_a_time(kind):
    """Padding in ``stack_memories`` (and a question that reads nothing) changes no logit."""
    mac, base, tok = tiny_mac(kind)
    head = prompt_head(base, tok)
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize(base, tok, head, DOCS)]
    reads = [[entries[0]], entries, [], [entries[2], entries[1]]]
    questions = ["Who approved the bridge?", "How many libraries opened in Norvale?", "What?", "What was harvested?"]
    answers = ["the council", "12", "kelp", "4,500 tonnes of kelp"]
    start = mac.start(head)
    with torch.no_grad():
        memory, mask = stack_memories(reads, base.device)
        ids, attn, labels = qa_batch(tok, questions, answers, head=head)
        batched = answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask, start=start)
        logits = prefixed_forward(base, ids, attn, memory, mask, head=head, start=start).logits
        for row, read in enumerate(reads):
            one, one_mask = stack_memories([read], base.device)
            ids1, attn1, labels1 = qa_batch(tok, [questions[row]], [answers[row]], head=head)
            alone = answer_nll(base, one, ids1, attn1, labels1, head=head, memory_mask=one_mask, start=start)
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-4)
            single = prefixed_forward(base, ids1, attn1, one, one_mask, head=head, start=start).logits[0]
            torch.testing.assert_close(logits[row, : ids1.shape[1]], single, atol=1e-5, rtol=1e-4)
        # what a question reads matters: the same question with another memory gives other logits
        other, other_mask = stack_memories([[entries[1]]], base.device)
        ids0, attn0, _ = qa_batch(tok, questions[:1], answers[:1], head=head)
        changed = prefixed_forward(base, ids0, attn0, other, other_mask, head=head, start=start).logits[0]
        assert (changed - logits[0, : ids0.shape[1]]).abs().max() > 1e-4  # float noise is ~1e-6


def test_memory_is_a_set():
    """Attention over slots does not depend on their order: entries read in any order are the same memory."""
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    with torch.no_grad():
        entries = [m for m, _ in mac.memorize(base, tok, head, DOCS)]
        ids, attn, labels = qa_batch(tok, ["Who approved the bridge?"], ["the council"], head=head)
        nll = []
        for order in (entries, entries[::-1]):
            memory, mask = stack_memories([order], base.device)
            nll.append(answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask, start=mac.start(head)))
    torch.testing.assert_close(nll[0], nll[1], atol=1e-5, rtol=1e-4)


def test_top_k_keeps_the_k_nearest_keys():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(20, 8, generator=g), dim=-1)
    ids = [f"d{i}" for i in range(20)]
    query = keys[7] + 0.01 * torch.randn(8, generator=g)
    chosen = select_top_k(query, ids, keys, 3)
    assert len(chosen) == 3 and chosen[0] == "d7"
    scores = keys @ query
    assert set(chosen) == {ids[i] for i in scores.topk(3).indices.tolist()}
    everything = select_top_k(query, ids, keys, 50)  # k past the bank: every entry, best first
    assert everything == [ids[i] for i in scores.argsort(descending=True).tolist()]


def test_bank_stream_skips_deleted_entries_and_keeps_the_order():
    bank = InMemoryMemoryBank()
    for i in range(10):
        bank.put(f"d{i}", torch.full((2, 2, 1, 1, 4), float(i)))
    bank.delete("d3")
    ids = [f"d{i}" for i in range(10)]
    for chunk in (1, 4, 64):
        streamed = list(iter_bank_entries(bank, ids, chunk=chunk))
        assert [int(e.flatten()[0]) for e in streamed] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
        assert all(e.shape == (2, 2, 1, 1, 4) and e.dtype == torch.float32 for e in streamed)
