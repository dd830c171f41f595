"""Memory as key/values in front of a prompt, through the cache API, on Llama- (GQA, rotary) and
GPT-2-style (absolute positions, fused QKV) models, and on the real SmolLM2.

The key property of the design: key/values the base model computed for a passage after the prompt
head, put back in the cache as memory, are exactly the passage in the prompt."""

from __future__ import annotations

import pytest
import torch

from training.mac.amortizer import segment_ids
from training.mac.model import prompt_head, strip_head
from training.mac.prefix import build_cache, greedy_generate, kv_geometry, prefixed_forward, token_positions
from training.models import tiny_causal_lm
from training.token_batches import prompt_ids

KINDS = ["llama", "gpt2"]
PASSAGE = "In 2031 the city of Norvale opened 12 libraries and 3 museums."
QUESTION = "How many libraries did Norvale open?"


def _batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _random_memory(model, batch, length, seed=0):
    layers, kv_heads, head_dim = kv_geometry(model.config)
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, kv_heads, length, head_dim, generator=g),
         torch.randn(batch, kv_heads, length, head_dim, generator=g))
        for _ in range(layers)
    ]


def _segment_memory(model, head, segment):
    """The full key/values of ``segment`` computed right after the head (what a RAG prompt holds)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(head.ids) + segment]), use_cache=True)
    return [(layer.keys[:, :, len(head):], layer.values[:, :, len(head):]) for layer in out.past_key_values.layers]


def _ones(n):
    return torch.ones(1, n, dtype=torch.long)


def test_kv_geometry_of_the_tiny_models():
    llama, _ = tiny_causal_lm("llama")
    gpt2, _ = tiny_causal_lm("gpt2")
    assert kv_geometry(llama.config) == (2, 2, 16)  # GQA keeps the 2 KV heads, not the 4 query heads
    assert kv_geometry(gpt2.config) == (2, 4, 16)


@pytest.mark.parametrize("kind", KINDS)
def test_memory_of_a_passage_equals_the_passage_in_the_prompt(kind):
    """Cache = [head, key/values of the passage segment]; the question's tokens, positioned right
    after the segment, give the logits of the full RAG prompt (forward pass and greedy decoding)."""
    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    segment = segment_ids(tok, head, PASSAGE)
    full = prompt_ids(tok, QUESTION, [PASSAGE])
    tail = strip_head(prompt_ids(tok, QUESTION), head)
    assert full == list(head.ids) + segment + tail  # the prompt splits into [head, segment, question]
    memory = _segment_memory(model, head, segment)
    start = len(head) + len(segment)

    with torch.no_grad():
        ref = model(input_ids=torch.tensor([full])).logits[0, start:]
        got = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory, head=head, start=start).logits[0]
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
        # positions matter: the same memory read from a later start is a different prompt
        shifted = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory, head=head,
                                   start=start + 7).logits[0]
        assert (shifted - ref).abs().max() > 1e-4
        # without the memory the passage is gone
        without = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), None, head=head, start=start).logits[0]
        assert (without - ref).abs().max() > 1e-3

    stop = {-1}
    by_prompt = greedy_generate(model, [full], None, pad_id=tok.pad_token_id, stop_ids=stop, max_new_tokens=6)
    by_memory = greedy_generate(model, [tail], memory, pad_id=tok.pad_token_id, stop_ids=stop, max_new_tokens=6,
                                head=head, start=start)
    assert by_memory == by_prompt and len(by_prompt[0]) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_start_is_right_after_the_cache(kind):
    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    segment = segment_ids(tok, head, PASSAGE)
    tail = strip_head(prompt_ids(tok, QUESTION), head)
    memory = _segment_memory(model, head, segment)
    with torch.no_grad():
        explicit = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory, head=head,
                                    start=len(head) + len(segment)).logits
        default = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory, head=head).logits
    torch.testing.assert_close(default, explicit)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_memory_is_exactly_the_base_model(kind, side):
    """With every memory slot masked out, positions and masks must reproduce the base model."""
    model, tok = tiny_causal_lm(kind)
    ids, mask = _batch(tok, ["The council approved the bridge.", "In 2031 Norvale opened 12 libraries and 3 museums."], side)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=token_positions(mask)).logits
        memory = _random_memory(model, 2, 5)
        masked = prefixed_forward(model, ids, mask, memory, memory_mask=torch.zeros(2, 5, dtype=torch.long),
                                  start=0).logits
        active = prefixed_forward(model, ids, mask, memory, start=0).logits
    real = mask.bool()
    torch.testing.assert_close(masked[real], base[real], atol=1e-5, rtol=1e-4)
    assert (active[real] - base[real]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_masked_slots_are_ignored_next_to_real_ones(kind):
    """A real memory plus masked random slots reads exactly like the real memory alone."""
    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    segment = segment_ids(tok, head, PASSAGE)
    real = _segment_memory(model, head, segment)
    noise = _random_memory(model, 1, 4, seed=3)
    padded = [(torch.cat([k, nk], 2), torch.cat([v, nv], 2)) for (k, v), (nk, nv) in zip(real, noise)]
    slot_mask = torch.cat([torch.ones(1, len(segment)), torch.zeros(1, 4)], 1).long()
    tail = strip_head(prompt_ids(tok, QUESTION), head)
    start = len(head) + len(segment) + 4
    with torch.no_grad():
        alone = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), real, head=head, start=start).logits
        got = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), padded, slot_mask, head=head,
                               start=start).logits
        unmasked = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), padded, head=head,
                                    start=start).logits
    torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-4)
    assert (unmasked - alone).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_memory_output_does_not_depend_on_padding(kind):
    model, tok = tiny_causal_lm(kind)
    texts = ["The council approved the bridge.", "Scientists reported a record harvest of 4,500 tonnes of kelp."]
    memory = _random_memory(model, 2, 3)
    ids, mask = _batch(tok, texts, "left")
    with torch.no_grad():
        batched = prefixed_forward(model, ids, mask, memory).logits
        for row, text in enumerate(texts):
            single_ids, single_mask = _batch(tok, [text])
            one = [(k[row : row + 1], v[row : row + 1]) for k, v in memory]
            alone = prefixed_forward(model, single_ids, single_mask, one).logits[0]
            torch.testing.assert_close(batched[row][mask[row].bool()], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_build_cache_is_head_then_memory_and_never_shared(kind):
    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    memory = _random_memory(model, 3, 5)
    cache = build_cache(model, 3, memory, head)
    layers, kv_heads, head_dim = kv_geometry(model.config)
    assert len(cache.layers) == layers
    for layer, (hk, hv), (k, v) in zip(cache.layers, head.kv, memory):
        assert layer.keys.shape == (3, kv_heads, len(head) + 5, head_dim)
        torch.testing.assert_close(layer.keys[:, :, : len(head)], hk.expand(3, -1, -1, -1))
        torch.testing.assert_close(layer.values[:, :, : len(head)], hv.expand(3, -1, -1, -1))
        torch.testing.assert_close(layer.keys[:, :, len(head):], k)
        torch.testing.assert_close(layer.values[:, :, len(head):], v)
    before = head.kv[0][0].clone()
    tail = strip_head(prompt_ids(tok, QUESTION), head)
    with torch.no_grad():
        prefixed_forward(model, torch.tensor([tail] * 3), torch.ones(3, len(tail), dtype=torch.long), memory, head=head)
    torch.testing.assert_close(head.kv[0][0], before)  # the shared head is not appended to


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_without_memory_matches_hf_generate(kind):
    model, tok = tiny_causal_lm(kind)
    prompts = [tok("The council approved")["input_ids"], tok("In 2031 the city of Norvale opened")["input_ids"]]
    ours = greedy_generate(model, prompts, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=6)
    for prompt, generated in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert generated == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_cached_prompt_head_reproduces_the_full_prompt(kind):
    """Cache = [shared head, masked memory]; running only the tails must equal running the whole
    prompts, for the forward pass and for greedy generation."""
    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    questions = ["Who approved the bridge?", "How many libraries did Norvale open in 2031?"]
    full = [prompt_ids(tok, q) for q in questions]
    tails = [strip_head(p, head) for p in full]
    assert len(head) > 10 and all(len(t) < len(p) for t, p in zip(tails, full))
    with pytest.raises(ValueError, match="prompt head"):
        strip_head(tok("Who approved the bridge?")["input_ids"], head)

    ref = greedy_generate(model, full, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5)
    ours = greedy_generate(model, tails, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5, head=head)
    assert ours == ref

    memory = _random_memory(model, 2, 3)
    off = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        for prompt, tail in zip(full, tails):
            base = model(input_ids=torch.tensor([prompt])).logits[0, len(head):]
            one = [(k[:1], v[:1]) for k, v in memory]
            got = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), one, memory_mask=off[:1], head=head,
                                   start=len(head)).logits[0]
            torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-4)
    masked = greedy_generate(model, tails, memory, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5,
                             head=head, memory_mask=off, start=len(head))
    assert masked == ref


@pytest.mark.real_model
def test_smollm2_reads_a_passage_from_memory_like_from_the_prompt():
    from training.models import load_causal_lm

    model, tok = load_causal_lm()
    model.requires_grad_(False)
    assert kv_geometry(model.config) == (30, 3, 64)
    head = prompt_head(model, tok)
    segment = segment_ids(tok, head, PASSAGE)
    full = prompt_ids(tok, QUESTION, [PASSAGE])
    tail = strip_head(prompt_ids(tok, QUESTION), head)
    assert full == list(head.ids) + segment + tail
    memory = _segment_memory(model, head, segment)
    start = len(head) + len(segment)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([full])).logits[0, start:]
        got = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory, head=head, start=start).logits[0]
        off = prefixed_forward(model, torch.tensor([tail]), _ones(len(tail)), memory,
                               memory_mask=torch.zeros(1, len(segment), dtype=torch.long), head=head, start=len(head)).logits[0]
        no_passage = model(input_ids=torch.tensor([prompt_ids(tok, QUESTION)])).logits[0, len(head):]
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(off, no_passage, atol=1e-3, rtol=1e-3)
    assert (ref - no_passage).abs().max() > 1e-1
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    answer = greedy_generate(model, [tail], memory, pad_id=tok.pad_token_id, stop_ids=stop, max_new_tokens=8,
                             head=head, start=start)
    assert "12" in tok.decode(answer[0])
