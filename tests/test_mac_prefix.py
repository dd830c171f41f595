"""P-tuning v2 prefixes through the transformers cache API on Llama- (GQA, rotary) and GPT-2-style
(absolute positions, fused QKV) models, and on the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

from training.mac.prefix import PrefixProjection, greedy_generate, kv_geometry, prefixed_forward
from training.models import tiny_causal_lm

KINDS = ["llama", "gpt2"]


def _batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _random_prefix(model, batch, length, seed=0):
    layers, kv_heads, head_dim = kv_geometry(model.config)
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, kv_heads, length, head_dim, generator=g),
         torch.randn(batch, kv_heads, length, head_dim, generator=g))
        for _ in range(layers)
    ]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_prefix_is_exactly_the_base_model(kind, side):
    """With the prefix masked out, positions and masks must reproduce the base model exactly."""
    model, tok = tiny_causal_lm(kind)
    ids, mask = _batch(tok, ["The council approved the bridge.", "In 2031 Norvale opened 12 libraries and 3 museums."], side)
    base = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    prefix = _random_prefix(model, 2, 5)
    masked = prefixed_forward(model, ids, mask, prefix, prefix_mask=torch.zeros(2, 5, dtype=torch.long)).logits
    real = mask.bool()
    torch.testing.assert_close(masked[real], base[real], atol=1e-5, rtol=1e-4)
    active = prefixed_forward(model, ids, mask, prefix).logits
    assert (active[real] - base[real]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_output_does_not_depend_on_padding(kind):
    model, tok = tiny_causal_lm(kind)
    texts = ["The council approved the bridge.", "Scientists reported a record harvest of 4,500 tonnes of kelp."]
    prefix = _random_prefix(model, 2, 3)
    ids, mask = _batch(tok, texts, "left")
    batched = prefixed_forward(model, ids, mask, prefix).logits
    for row, text in enumerate(texts):
        single_ids, single_mask = _batch(tok, [text])
        one = [(k[row : row + 1], v[row : row + 1]) for k, v in prefix]
        alone = prefixed_forward(model, single_ids, single_mask, one).logits[0]
        torch.testing.assert_close(batched[row][mask[row].bool()], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_matches_kv_geometry_and_carries_gradients(kind):
    model, _ = tiny_causal_lm(kind)
    model.requires_grad_(False)
    layers, kv_heads, head_dim = kv_geometry(model.config)
    assert (layers, kv_heads) == ((2, 2) if kind == "llama" else (2, 4))  # GQA keeps the KV heads
    projection = PrefixProjection(64, model.config, bottleneck=16)
    modulation = torch.randn(3, 6, 64, requires_grad=True)
    prefix = projection(modulation)
    assert len(prefix) == layers and prefix[0][0].shape == (3, kv_heads, 6, head_dim)
    ids = torch.randint(5, 100, (3, 7))
    prefixed_forward(model, ids, torch.ones_like(ids), prefix).logits.sum().backward()
    assert modulation.grad is not None and modulation.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_without_prefix_matches_hf_generate(kind):
    model, tok = tiny_causal_lm(kind)
    prompts = [tok("The council approved")["input_ids"], tok("In 2031 the city of Norvale opened")["input_ids"]]
    ours = greedy_generate(model, prompts, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=6)
    for prompt, generated in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert generated == ref[0, len(prompt):].tolist()


@pytest.mark.real_model
def test_prefix_changes_smollm2_logits():
    from training.models import load_causal_lm

    model, tok = load_causal_lm()
    model.requires_grad_(False)
    layers, kv_heads, head_dim = kv_geometry(model.config)
    assert (layers, kv_heads, head_dim) == (30, 3, 64)
    ids, mask = _batch(tok, ["Question: Who approved the bridge?\nAnswer:"])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        projection = PrefixProjection(576, model.config, bottleneck=32)
        prefix = projection(torch.randn(1, 4, 576))
        masked = prefixed_forward(model, ids, mask, prefix, prefix_mask=torch.zeros(1, 4, dtype=torch.long)).logits
        active = prefixed_forward(model, ids, mask, prefix).logits
    torch.testing.assert_close(masked, base, atol=1e-4, rtol=1e-4)
    assert (active - base).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_cached_prompt_head_reproduces_the_full_prompt(kind):
    """Cache = [masked prefix, shared head]; running only the tails must equal running the whole
    prompts, for the forward pass and for greedy generation."""
    from training.mac.model import prompt_head, prompt_ids, strip_head

    model, tok = tiny_causal_lm(kind)
    head = prompt_head(model, tok)
    questions = ["Who approved the bridge?", "How many libraries did Norvale open in 2031?"]
    full = [prompt_ids(tok, q) for q in questions]
    tails = [strip_head(p, head) for p in full]
    assert len(head) > 10 and all(len(t) < len(p) for t, p in zip(tails, full))

    ref = greedy_generate(model, full, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5)
    ours = greedy_generate(model, tails, None, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5, head=head)
    assert ours == ref

    prefix = _random_prefix(model, 2, 3)
    off = torch.zeros(2, 3, dtype=torch.long)
    for prompt, tail in zip(full, tails):
        base = model(input_ids=torch.tensor([prompt])).logits[0, len(head):]
        one = [(k[:1], v[:1]) for k, v in prefix]
        got = prefixed_forward(model, torch.tensor([tail]), torch.ones(1, len(tail), dtype=torch.long), one,
                               prefix_mask=off[:1], head=head).logits[0]
        torch.testing.assert_close(got, base, atol=1e-5, rtol=1e-4)
    masked = greedy_generate(model, tails, prefix, pad_id=tok.pad_token_id, stop_ids={-1}, max_new_tokens=5, head=head)
    assert len(masked) == 2
