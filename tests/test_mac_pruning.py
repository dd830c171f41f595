"""Token pruning inside the amortizer's pass: the layers below the pruning point are the full
pass; above it, the kept tokens are computed as if the dropped ones had never been there."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.mac_helpers import TINY_MAC, tiny_mac
from training.mac.amortizer import eager_attention, heavy_hitter_scores, segment_ids
from training.mac.model import prompt_head
from training.mac.prefix import kv_geometry
from training.mac.pruning import decoder_parts, pruned_upper_layers, recorded_attention
from training.models import tiny_causal_lm

KINDS = ["llama", "gpt2"]
DOC = "In 2031 the city of Norvale opened 12 libraries and 3 museums, the council said on Tuesday."


def _pass(base, head, ids, positions, cache=None, inputs_embeds=None):
    """A plain forward pass after the head's cache (or ``cache``); returns the cache."""
    cache = cache if cache is not None else DynamicCache([(k.clone(), v.clone()) for k, v in head.kv],
                                                         config=base.config)
    with torch.no_grad():
        base.base_model(input_ids=None if ids is None else torch.tensor([ids]), inputs_embeds=inputs_embeds,
                        past_key_values=cache, use_cache=True, position_ids=torch.tensor([positions]))
    return cache


@pytest.mark.parametrize("kind", KINDS)
def test_decoder_parts_finds_every_layer_and_its_attention(kind):
    base, _ = tiny_causal_lm(kind, num_layers=3)
    parts = decoder_parts(base)
    assert len(parts) == 3
    assert all(attention in set(layer.modules()) for layer, attention in parts)
    with torch.no_grad(), eager_attention(base), recorded_attention(base) as weights:
        base(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert [w.shape for w in weights] == [(1, 4, 4, 4)] * 3
    with pytest.raises(RuntimeError, match="eager attention"), torch.no_grad(), recorded_attention(base):
        base(input_ids=torch.tensor([[5, 6, 7, 8]]))  # SDPA returns no weights


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("after_layer", [0, 1, 2])
def test_kept_tokens_above_the_pruning_point(kind, after_layer):
    """Below ``after_layer``: the full pass. From it up, pruning from layer 0 is the same as never
    having the dropped tokens (a pass over the kept tokens alone, at their own positions); the
    tokens typed after the chunk (the memory tokens) see the same cache either way."""
    base, tok = tiny_causal_lm(kind, num_layers=3)
    head = prompt_head(base, tok)
    start = len(head)
    segment = tok(DOC, add_special_tokens=False)["input_ids"]
    length = len(segment)
    kept = torch.tensor([0, 2, 3, 7, length - 4, length - 1])
    dropped = torch.tensor([i for i in range(length) if i not in set(kept.tolist())])
    positions = list(range(start, start + length))
    with eager_attention(base):
        full = _pass(base, head, segment, positions)
        with pruned_upper_layers(base, after_layer, length, start + length, lambda: start + dropped, lambda: kept):
            pruned = _pass(base, head, segment, positions)
        alone = _pass(base, head, [segment[i] for i in kept], [positions[i] for i in kept])
        extra = torch.randn(1, 3, base.config.hidden_size)
        extra_positions = list(range(start + length, start + length + 3))
        with pruned_upper_layers(base, after_layer, 3, start + length + 3, lambda: start + dropped, lambda: None):
            pruned = _pass(base, head, None, extra_positions, cache=pruned, inputs_embeds=extra)
        alone = _pass(base, head, None, extra_positions, cache=alone, inputs_embeds=extra)
        full = _pass(base, head, None, extra_positions, cache=full, inputs_embeds=extra)
    for layer, (p, f, a) in enumerate(zip(pruned.layers, full.layers, alone.layers)):
        if layer < after_layer:
            torch.testing.assert_close(p.keys, f.keys)
            torch.testing.assert_close(p.values, f.values)
        else:
            assert p.keys.shape[2] == start + len(kept) + 3
            if after_layer == 0:
                torch.testing.assert_close(p.keys, a.keys, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(p.values, a.values, atol=1e-5, rtol=1e-4)
        if layer > after_layer:  # the extra tokens' inputs went through a pruned attention below
            assert not torch.allclose(p.values[..., start + len(kept):, :], f.values[..., start + length:, :],
                                      atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pruned_entry_keeps_the_most_attended_tokens_above_the_pruning_point(kind):
    """Survivors = top ``prune_keep`` of the heavy-hitter scores summed over the layers below;
    above, each layer keeps its ``doc_slots`` heavy hitters among them; below, among all tokens."""
    config = TINY_MAC.model_copy(update={"doc_slots": 4, "memory_tokens": 2, "prune_after_layer": 1,
                                         "prune_keep": 6})
    mac, base, tok = tiny_mac(kind, config)
    base_unpruned = mac.amortizer.config.model_copy(update={"prune_after_layer": None})
    head = prompt_head(base, tok)
    segment = segment_ids(tok, head, DOC)
    start, length = len(head), len(segment)
    with torch.no_grad():
        (entry, _), = mac.memorize(base, tok, head, [DOC])
        mac.amortizer.config = base_unpruned
        (unpruned, _), = mac.memorize(base, tok, head, [DOC])
    layers, kv_heads, _ = kv_geometry(base.config)
    assert entry.shape == unpruned.shape and entry.shape[3] == 4 + 2
    torch.testing.assert_close(entry[0, :, :, :4], unpruned[0, :, :, :4])  # layer 0 sees every token
    assert not torch.allclose(entry[1:], unpruned[1:])

    with torch.no_grad(), eager_attention(base), recorded_attention(base) as weights:
        _pass(base, head, segment, list(range(start, start + length)))
    received = heavy_hitter_scores(weights[:1], start, length, kv_heads)[0].sum(0)
    kept = received.topk(6).indices.sort().values
    dropped = torch.tensor([i for i in range(length) if i not in set(kept.tolist())])
    with torch.no_grad(), eager_attention(base), recorded_attention(base) as weights:
        with pruned_upper_layers(base, 1, length, start + length, lambda: start + dropped, lambda: kept):
            cache = _pass(base, head, segment, list(range(start, start + length)))
    for layer in range(1, layers):
        scores = heavy_hitter_scores(weights[layer:layer + 1], start, 6, kv_heads)[0]
        chosen = scores.topk(4, dim=-1).indices.sort(-1).values
        keys = cache.layers[layer].keys[0, :, start:]
        for kv in range(kv_heads):
            torch.testing.assert_close(entry[layer, 0, kv, :4], keys[kv, chosen[kv]], atol=1e-5, rtol=1e-4)


def test_pruning_is_off_when_the_chunk_is_not_longer_than_what_is_kept():
    config = TINY_MAC.model_copy(update={"prune_after_layer": 1, "prune_keep": 1000})
    mac, base, tok = tiny_mac("llama", config)
    head = prompt_head(base, tok)
    with torch.no_grad():
        (entry, _), = mac.memorize(base, tok, head, [DOC])
        mac.amortizer.config = config.model_copy(update={"prune_after_layer": None})
        (plain, _), = mac.memorize(base, tok, head, [DOC])
    torch.testing.assert_close(entry, plain)
