"""Aggregation over memory entries: hierarchical vs flat, bounded groups, top-k pre-selection."""

from __future__ import annotations

import pytest
import torch

from training.mac.aggregator import Aggregator, aggregate, iter_bank_entries, select_top_k
from training.memory_bank import InMemoryMemoryBank


@pytest.fixture
def agg():
    torch.manual_seed(0)
    return Aggregator(dim=16, heads=4, layers=2).eval()


def _entries(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i % 2, 16, generator=g) for i in range(n)]  # uneven entry sizes


def test_hierarchical_with_large_groups_equals_flat(agg):
    query, entries = torch.randn(2, 4, 16), _entries(7)
    flat = aggregate(agg, query, entries)
    for group in (7, 8, 100):
        torch.testing.assert_close(aggregate(agg, query, iter(entries), group_size=group), flat)


def test_hierarchical_groups_bound_what_one_call_sees(agg):
    query, entries = torch.randn(1, 4, 16), _entries(50)
    seen = []
    hook = agg.register_forward_pre_hook(lambda m, args: seen.append(0 if args[1] is None else args[1].shape[1]))
    out = aggregate(agg, query, iter(entries), group_size=4)
    hook.remove()
    assert out.shape == (1, 4, 16) and torch.isfinite(out).all()
    assert max(seen) <= 4 * 4  # never more than one group of (<= 4-token) entries at once
    assert len(seen) == 13 + 4 + 1  # 13 groups, then 4 groups of results, then the root
    assert not torch.allclose(out, aggregate(agg, query, entries))  # hierarchical is a different function


def test_empty_memory_still_gives_a_modulation(agg):
    query = torch.randn(2, 4, 16)
    torch.testing.assert_close(aggregate(agg, query, []), aggregate(agg, query, [], group_size=3))
    assert aggregate(agg, query, []).shape == (2, 4, 16)


def test_the_modulation_is_read_from_memory_not_from_the_question(agg):
    """The question only steers the reading: a memory of identical tokens gives one modulation for
    every question (attention over identical tokens reads the same thing), and an empty memory
    gives zeros whatever the question."""
    token = torch.randn(1, 16)
    memory = [token.expand(5, 16)]
    one, other = aggregate(agg, torch.randn(1, 4, 16), memory), aggregate(agg, torch.randn(1, 4, 16), memory)
    torch.testing.assert_close(one, other)
    assert aggregate(agg, torch.randn(1, 4, 16), []).abs().max() == 0
    distinct = _entries(5)
    assert not torch.allclose(aggregate(agg, torch.randn(1, 4, 16), distinct),
                              aggregate(agg, torch.randn(1, 4, 16), distinct))


def test_memory_is_a_set(agg):
    query, entries = torch.randn(1, 4, 16), _entries(5)
    torch.testing.assert_close(aggregate(agg, query, entries), aggregate(agg, query, entries[::-1]))


def test_top_k_keeps_the_k_nearest_keys():
    keys = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    ids = [f"d{i}" for i in range(20)]
    query = keys[7] + 0.01 * torch.randn(8)
    chosen = select_top_k(query, ids, keys, 3)
    assert len(chosen) == 3 and chosen[0] == "d7"
    scores = keys @ query
    assert set(chosen) == {ids[i] for i in scores.topk(3).indices.tolist()}
    assert select_top_k(query, ids, keys, 50) == ids


def test_bank_stream_skips_deleted_entries():
    bank = InMemoryMemoryBank()
    for i in range(10):
        bank.put(f"d{i}", torch.full((2, 4), float(i)))
    bank.delete("d3")
    streamed = list(iter_bank_entries(bank, [f"d{i}" for i in range(10)], chunk=4))
    assert [int(e[0, 0]) for e in streamed] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
