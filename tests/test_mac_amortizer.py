"""The amortizer: a document's memory entry is what the frozen base model itself computed for the
passage after the prompt head (its heavy-hitter slots) plus learned memory tokens."""

from __future__ import annotations

import math

import pytest
import torch

from tests.mac_helpers import TINY_MAC, expected_slots, tiny_mac
from training.mac.aggregator import stack_memories
from training.mac.amortizer import (
    RECONSTRUCTION_PROMPT,
    chunk_texts,
    eager_attention,
    heavy_hitter_scores,
    segment_ids,
)
from training.mac.model import answer_nll, prompt_head, qa_batch
from training.mac.prefix import kv_geometry
from training.models import tiny_causal_lm

KINDS = ["llama", "gpt2"]
DOC = "In 2031 the city of Norvale opened 12 libraries and 3 museums."
LONG = " ".join([
    "The council approved the new harbour bridge on Tuesday.",
    "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
    "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp.",
] * 4)


def _full_run(base, ids, inputs_embeds=None):
    """One plain forward pass from position 0 with eager attention and attention weights."""
    previous = base.config._attn_implementation
    base.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            if inputs_embeds is None:
                return base(input_ids=torch.tensor([ids]), use_cache=True, output_attentions=True)
            return base(inputs_embeds=inputs_embeds, use_cache=True, output_attentions=True)
    finally:
        base.set_attn_implementation(previous)


# --- eager attention -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_eager_attention_restores_the_previous_implementation(kind):
    model, tok = tiny_causal_lm(kind)
    ids = torch.tensor([tok("The council approved the bridge.")["input_ids"]])
    assert model.config._attn_implementation == "sdpa"
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
        out = model(input_ids=ids, output_attentions=True)
        assert out.attentions is not None and out.attentions[0].shape[-1] == ids.shape[1]
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"):
        with eager_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with eager_attention(model):
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"  # was eager before: stays eager


def test_memorize_leaves_the_attention_implementation_alone():
    mac, base, tok = tiny_mac()
    with torch.no_grad():
        mac.memorize(base, tok, prompt_head(base, tok), [DOC])
    assert base.config._attn_implementation == "sdpa"


# --- heavy hitters ---------------------------------------------------------------------------


def test_heavy_hitter_scores_are_the_mean_attention_from_later_tokens():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, offset, length = 4, 2, 3, 5
    causal = torch.ones(length, offset + length).tril(offset)  # query i sees keys up to offset + i
    attentions = tuple(torch.rand(1, heads, length, offset + length, generator=g) * causal for _ in range(2))
    scores = heavy_hitter_scores(attentions, offset, length, kv_heads)
    assert len(scores) == 2 and all(s.shape == (kv_heads, length) for s in scores)
    group = heads // kv_heads
    for att, score in zip(attentions, scores):
        for kv in range(kv_heads):
            for j in range(length):
                expected = sum(
                    sum(att[0, h, i, offset + j].item() for i in range(j, length)) / (length - j)
                    for h in range(kv * group, (kv + 1) * group)
                )
                assert score[kv, j].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_without_selection_the_entry_is_the_passage_itself(kind):
    """``doc_slots`` >= the segment and no memory tokens: the entry is the segment's full key/values
    after the head, and answering from it equals answering with the passage in the prompt."""
    cfg = TINY_MAC.model_copy(update={"doc_slots": 1000, "memory_tokens": 0})
    mac, base, tok = tiny_mac(kind, cfg)
    head = prompt_head(base, tok)
    segment = segment_ids(tok, head, DOC)
    with torch.no_grad():
        (entry, key), = mac.memorize(base, tok, head, [DOC])
    layers, kv_heads, head_dim = kv_geometry(base.config)
    assert entry.shape == (layers, 2, kv_heads, len(segment), head_dim)
    full = _full_run(base, list(head.ids) + segment)
    for layer, cached in enumerate(full.past_key_values.layers):
        torch.testing.assert_close(entry[layer, 0], cached.keys[0, :, len(head):], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entry[layer, 1], cached.values[0, :, len(head):], atol=1e-5, rtol=1e-4)

    question, answer = "How many libraries did Norvale open?", "12"
    with torch.no_grad():
        memory, mask = stack_memories([[entry]], base.device)
        ids, attn, labels = qa_batch(tok, [question], [answer], head=head)
        from_memory = answer_nll(base, memory, ids, attn, labels, head=head, memory_mask=mask,
                                 start=len(head) + len(segment))
        ids, attn, labels = qa_batch(tok, [question], [answer], passages=[[DOC]], head=head)
        from_prompt = answer_nll(base, None, ids, attn, labels, head=head)
    torch.testing.assert_close(from_memory, from_prompt, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_entry_keeps_the_heavy_hitters_and_the_memory_tokens(kind):
    """Per layer and KV head: the ``doc_slots`` document tokens that received the most attention
    from the rest of the passage (in document order), then the memory tokens' key/values as if
    they had been typed after the passage."""
    cfg = TINY_MAC.model_copy(update={"doc_slots": 5, "memory_tokens": 3})
    mac, base, tok = tiny_mac(kind, cfg)
    head = prompt_head(base, tok)
    segment = segment_ids(tok, head, DOC)
    offset, length = len(head), len(segment)
    with torch.no_grad():
        (entry, _), = mac.memorize(base, tok, head, [DOC])
    layers, kv_heads, head_dim = kv_geometry(base.config)
    assert entry.shape == (layers, 2, kv_heads, 5 + 3, head_dim)

    full = _full_run(base, list(head.ids) + segment)
    group = base.config.num_attention_heads // kv_heads
    embeds = base.get_input_embeddings()(torch.tensor([list(head.ids) + segment]))
    with_tokens = _full_run(base, None, torch.cat([embeds, mac.amortizer.memory_tokens.detach()[None]], 1))
    for layer in range(layers):
        att = full.attentions[layer][0]  # [heads, q, kv]
        keys = full.past_key_values.layers[layer].keys[0, :, offset:]
        values = full.past_key_values.layers[layer].values[0, :, offset:]
        for kv in range(kv_heads):
            received = att[kv * group : (kv + 1) * group, offset:, offset : offset + length].sum(0)  # [q, doc]
            scores = torch.stack([received[j:, j].sum() / (length - j) for j in range(length)])
            chosen = scores.topk(5).indices.sort().values
            torch.testing.assert_close(entry[layer, 0, kv, :5], keys[kv, chosen], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(entry[layer, 1, kv, :5], values[kv, chosen], atol=1e-5, rtol=1e-4)
        tokens = with_tokens.past_key_values.layers[layer]
        torch.testing.assert_close(entry[layer, 0, :, 5:], tokens.keys[0, :, offset + length :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(entry[layer, 1, :, 5:], tokens.values[0, :, offset + length :], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_scores_keep_the_tokens_a_repeat_of_the_document_attends_to(kind):
    """``slot_scores="kvzip"``: per layer and KV head, the document tokens that
    received the most attention (max over the KV head's query heads and over queries) while the
    model re-read the document after the repeat instruction; the memory tokens never see that
    re-reading (the cache is cropped back before them)."""
    cfg = TINY_MAC.model_copy(update={"doc_slots": 5, "memory_tokens": 3})
    mac, base, tok = tiny_mac(kind, cfg)
    head = prompt_head(base, tok)
    segment = segment_ids(tok, head, DOC)
    offset, length = len(head), len(segment)
    prompt = tok(RECONSTRUCTION_PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        (entry, _), = mac.memorize(base, tok, head, [DOC], slot_scores="kvzip")
        (by_attention, _), = mac.memorize(base, tok, head, [DOC])
    layers, kv_heads, _ = kv_geometry(base.config)
    assert entry.shape == (layers, 2, kv_heads, 5 + 3, base.config.hidden_size // base.config.num_attention_heads)

    full = _full_run(base, list(head.ids) + segment + prompt + segment)
    group = base.config.num_attention_heads // kv_heads
    for layer in range(layers):
        att = full.attentions[layer][0]  # [heads, q, kv]
        keys = full.past_key_values.layers[layer].keys[0, :, offset:]
        values = full.past_key_values.layers[layer].values[0, :, offset:]
        for kv in range(kv_heads):
            received = att[kv * group : (kv + 1) * group, offset + length :, offset : offset + length]
            chosen = received.amax((0, 1)).topk(5).indices.sort().values
            torch.testing.assert_close(entry[layer, 0, kv, :5], keys[kv, chosen], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(entry[layer, 1, kv, :5], values[kv, chosen], atol=1e-5, rtol=1e-4)
    # the memory tokens' slots are the same whichever document slots were kept
    torch.testing.assert_close(entry[..., 5:, :], by_attention[..., 5:, :], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_slot_counts_for_short_and_long_documents(kind):
    mac, base, tok = tiny_mac(kind, TINY_MAC.model_copy(update={"doc_slots": 40}))
    cfg = mac.config
    head = prompt_head(base, tok)
    short = "Kelp."
    n_long = len(tok(LONG, add_special_tokens=False)["input_ids"])
    assert n_long > cfg.max_chunks * cfg.chunk_tokens  # longer than what is kept
    chunks = chunk_texts(tok, LONG, cfg)
    assert len(chunks) == cfg.max_chunks
    medium = tok.decode(tok(LONG, add_special_tokens=False)["input_ids"][: cfg.chunk_tokens + 10])
    assert len(chunk_texts(tok, medium, cfg)) == math.ceil((cfg.chunk_tokens + 10) / cfg.chunk_tokens) == 2
    with torch.no_grad():
        entries = {text: entry for text, (entry, _) in
                   zip([short, DOC, medium, LONG], mac.memorize(base, tok, head, [short, DOC, medium, LONG]))}
    assert len(segment_ids(tok, head, short)) < cfg.doc_slots < len(segment_ids(tok, head, DOC))
    assert entries[short].shape[3] == len(segment_ids(tok, head, short)) + cfg.memory_tokens
    assert entries[DOC].shape[3] == cfg.doc_slots + cfg.memory_tokens
    assert entries[medium].shape[3] == expected_slots(cfg, tok, head, medium)
    assert entries[LONG].shape[3] == cfg.max_chunks * (cfg.doc_slots + cfg.memory_tokens)
    # one group of slots per chunk, side by side: each is the chunk's own entry
    with torch.no_grad():
        per_chunk = [mac.amortizer.encode_chunk(base, head, segment_ids(tok, head, c)) for c in chunks]
    torch.testing.assert_close(entries[LONG], torch.cat(per_chunk, dim=3))
    assert not torch.allclose(per_chunk[0], per_chunk[1])


def test_questions_start_after_every_slot():
    """``MAC.start`` must lie beyond the position of every slot any chunk can produce."""
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    longest = max(len(segment_ids(tok, head, c)) for c in chunk_texts(tok, LONG, mac.config))
    assert len(head) + longest + mac.config.memory_tokens <= mac.start(head)
    assert mac.start(None) == mac.start(head) - len(head)


def test_document_slots_do_not_depend_on_the_memory_tokens():
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    n = mac.config.memory_tokens
    with torch.no_grad():
        (before, key_before), = mac.memorize(base, tok, head, [DOC])
        mac.amortizer.memory_tokens.add_(torch.randn_like(mac.amortizer.memory_tokens))
        (after, key_after), = mac.memorize(base, tok, head, [DOC])
    torch.testing.assert_close(after[..., :-n, :], before[..., :-n, :])
    assert (after[..., -n:, :] - before[..., -n:, :]).abs().max() > 1e-3
    torch.testing.assert_close(key_after, key_before)  # the retrieval key is the encoder's


def test_memorize_is_per_document_and_keys_are_unit_vectors():
    mac, base, tok = tiny_mac()
    head = prompt_head(base, tok)
    docs = [DOC, "The council approved the new harbour bridge on Tuesday."]
    with torch.no_grad():
        together = mac.memorize(base, tok, head, docs)
        alone = [mac.memorize(base, tok, head, [d])[0] for d in docs]
    for (entry, key), (entry1, key1) in zip(together, alone):
        torch.testing.assert_close(entry, entry1)
        torch.testing.assert_close(key, key1, atol=1e-6, rtol=1e-5)
        assert key.shape == (32,) and key.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(together[0][1], together[1][1])


def test_the_runtime_writes_entries_with_its_slot_scores():
    """``MacReadConfig.slot_scores`` (the service's ``FRESHLM_MAC_SLOT_SCORES``) reaches the write."""
    from training.mac.runtime import MacReadConfig, MacRuntime
    from training.memory import InMemoryMemoryBank

    mac, base, tok = tiny_mac(config=TINY_MAC.model_copy(update={"doc_slots": 5}))
    head = prompt_head(base, tok)
    with torch.no_grad():
        expected = {scores: mac.memorize(base, tok, head, [DOC], slot_scores=scores)[0][0] for scores in ("h2o", "kvzip")}
    assert not torch.allclose(expected["h2o"], expected["kvzip"])
    for scores, entry in expected.items():
        runtime = MacRuntime(mac, base, tok, InMemoryMemoryBank("float16"), MacReadConfig(slot_scores=scores))
        runtime.memorize(["d"], [DOC])
        torch.testing.assert_close(runtime.bank.get(["d"])[0].float(), entry.half().float())
