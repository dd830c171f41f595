"""Batched generation equals generation one question at a time (greedy, token for token): left
padding, the attention mask and the position ids must make a row's answer independent of the
other rows, including rows on other adapter versions (PEFT ``adapter_names``), rows with and
without passages (mixed strategies), and rows stopped early by the step hook."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from training.models import tiny_causal_lm
from training.pipeline import generate
from training.prompts import extract_answer

QUESTIONS = [
    "Who approved the harbour bridge?",
    "How many libraries opened in Norvale in 2031, and when?",
    "Which team won?",
    "What is the price of the new scooter model that Quorra Motors sells in three cities?",
]
PASSAGES = [
    ["The council of Norvale approved the Saltmarsh Bridge on Tuesday; it will cost 42 million crowns."],
    None,
    ["Pelham Rovers beat Ashgrove United 3 to 1.", "The final was played at Lindqvist Stadium."],
    None,
]
MAX_NEW = 8


def sharp(kind: str):
    """A tiny random model with scaled-up weights: peaked next-token distributions, so answers
    differ from question to question (at scale 1 they are mostly empty) and any difference shows."""
    model, tokenizer = tiny_causal_lm(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model, tokenizer


def with_two_versions(model):
    """A PEFT model with an identity adapter and two random, different LoRA versions."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft = get_peft_model(model, config, adapter_name="identity")
    for i, name in enumerate(["v1", "v2"]):
        peft.add_adapter(name, config)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            for key, p in peft.named_parameters():
                if f".{name}." in key:
                    p.normal_(0, 0.5)
    return peft.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_batch_answers_like_each_question_alone(kind, one_torch_thread):
    model, tokenizer = sharp(kind)
    alone = [generate(model, tokenizer, [q], [p], MAX_NEW)[0] for q, p in zip(QUESTIONS, PASSAGES)]
    together = generate(model, tokenizer, QUESTIONS, PASSAGES, MAX_NEW)
    assert together == alone
    assert len({a for a, *_ in alone}) > 2, "answers must differ between questions for this test to mean something"


def test_rows_on_two_adapter_versions_and_the_base_in_one_batch(one_torch_thread):
    model, tokenizer = sharp("llama")
    peft = with_two_versions(model)
    names = ["v1", "v2", "__base__", "v2"]
    alone = [generate(peft, tokenizer, [q], [p], MAX_NEW, adapter_names=[n])[0]
             for q, p, n in zip(QUESTIONS, PASSAGES, names)]
    together = generate(peft, tokenizer, QUESTIONS, PASSAGES, MAX_NEW, adapter_names=names)
    assert together == alone
    # the versions really differ: the same question answered on each gives different answers
    per_version = {n: generate(peft, tokenizer, QUESTIONS[:1], PASSAGES[:1], MAX_NEW, adapter_names=[n])[0][0]
                   for n in ("v1", "v2", "__base__")}
    assert len(set(per_version.values())) == 3


def test_the_step_hook_sees_each_rows_tokens_and_stops_one_row(one_torch_thread):
    model, tokenizer = sharp("llama")
    alone = [generate(model, tokenizer, [q], [p], MAX_NEW)[0][0] for q, p in zip(QUESTIONS, PASSAGES)]
    seen: dict[int, list[int]] = {i: [] for i in range(len(QUESTIONS))}

    def hook(tokens: dict[int, int | None]) -> set[int]:
        for i, token in tokens.items():
            if token is not None:
                seen[i].append(token)
        return {1} if len(seen[1]) >= 2 else set()  # row 1's client "left" after two tokens

    together = [a for a, *_ in generate(model, tokenizer, QUESTIONS, PASSAGES, MAX_NEW, on_step=hook)]
    assert len(seen[1]) == 2
    for i in (0, 2, 3):  # the other rows are untouched, and what the hook saw is what they answered
        assert together[i] == alone[i]
        assert extract_answer(tokenizer.decode(seen[i], skip_special_tokens=True)) == alone[i]


@pytest.mark.real_model
def test_smollm2_batch_answers_like_each_question_alone(one_torch_thread):
    """The served base (SmolLM2 with the shipped QA-format tuning merged), rag and none rows mixed."""
    from service.core.config import Settings
    from service.runtime import load_base_model

    model, tokenizer = load_base_model(Settings(_env_file=None))
    alone = [generate(model, tokenizer, [q], [p], MAX_NEW)[0] for q, p in zip(QUESTIONS, PASSAGES)]
    assert generate(model, tokenizer, QUESTIONS, PASSAGES, MAX_NEW) == alone
    assert alone[0][0] and alone[2][0]  # real answers, not empty ones
    from training.prefix_cache import PrefixCache, PrefixCacheConfig

    cache = PrefixCache(PrefixCacheConfig())
    for _ in range(2):  # cold (the system prompt shared), then warm (all but each prompt's last token)
        assert generate(model, tokenizer, QUESTIONS, PASSAGES, MAX_NEW, prefix_cache=cache) == alone


def test_bf16_autocast_only_where_asked_or_native(one_torch_thread):
    from training.precision import autocast, cpu_bf16_enabled, cpu_bf16_flags

    assert not cpu_bf16_enabled("off", "cpu") and cpu_bf16_enabled("on", "cpu")
    assert cpu_bf16_enabled("auto", "cpu") == ("amx_bf16" in cpu_bf16_flags() and torch.backends.mkldnn.is_available())
    model, tokenizer = sharp("llama")
    ids = tokenizer("Who approved the bridge?", return_tensors="pt")["input_ids"]
    with autocast("cpu", True):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    with autocast("cpu", False):
        assert model(input_ids=ids).logits.dtype == torch.float32


def test_a_warm_prefix_cache_answers_like_a_cold_prefill_per_adapter_version(one_torch_thread):
    """Prompts sharing the system prompt (and question 0's passage, asked on both versions) reuse
    cached key/values only within their namespace: a version reading the other's key/values would
    answer differently (the versions' answers differ, asserted above)."""
    from training.prefix_cache import PrefixCache, PrefixCacheConfig

    model, tokenizer = sharp("llama")
    peft = with_two_versions(model)
    questions, passages = QUESTIONS + QUESTIONS[:1], PASSAGES + PASSAGES[:1]
    names = ["v1", "v2", "__base__", "v2", "v1"]
    alone = [generate(peft, tokenizer, [q], [p], MAX_NEW, adapter_names=[n])[0]
             for q, p, n in zip(questions, passages, names)]
    cache = PrefixCache(PrefixCacheConfig())
    for _ in range(2):  # cold, then every prompt cached but its last token
        assert generate(peft, tokenizer, questions, passages, MAX_NEW, adapter_names=names, prefix_cache=cache,
                        cache_namespaces=names) == alone
    assert cache.hit_tokens > cache.prompt_tokens / 2
    other = PrefixCache(PrefixCacheConfig())  # v2 asks question 0 first: v1 must not reuse it
    generate(peft, tokenizer, QUESTIONS[:1], PASSAGES[:1], MAX_NEW, adapter_names=["v2"], prefix_cache=other,
             cache_namespaces=["v2"])
    assert generate(peft, tokenizer, QUESTIONS[:1], PASSAGES[:1], MAX_NEW, adapter_names=["v1"], prefix_cache=other,
                    cache_namespaces=["v1"]) == [alone[0]]


def test_the_prefix_cache_keeps_the_most_recently_used_prefixes_within_its_budget():
    from training.prefix_cache import PrefixCache, PrefixCacheConfig

    def kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4))]

    per_entry = 2 * 2 * 9 * 4 * 4  # keys + values, 2 heads, 9 of 10 tokens, dim 4, fp32
    cache = PrefixCache(PrefixCacheConfig(max_mb=2.5 * per_entry / 2**20))
    a, b, c = list(range(10)), list(range(100, 110)), list(range(200, 210))
    cache.store("t", a, kv(10))
    cache.store("t", b, kv(10))
    assert cache.lookup("t", a + [7])[0] == 9 and cache.lookup("u", a + [7]) == (0, None)  # per namespace
    cache.store("t", c, kv(10))  # over budget: b, the least recently used, goes
    assert len(cache) == 2 and cache.bytes == 2 * per_entry
    assert cache.lookup("t", b + [1])[0] == 0 and cache.lookup("t", a[:5] + [1])[0] == 5
    length, hit = cache.lookup("t", c)
    assert length == 9 and hit.layers[0].keys.shape == (1, 2, 9, 4)


def decoded_alone(model, stop: set[int], pad: int, prompt, limit: int, adapter: str) -> list[int]:
    """One row's tokens decoded in a batch of its own (what every batched row must equal)."""
    from training.decode_batch import DecodeBatch

    single = DecodeBatch(model, stop, pad)
    single.admit([prompt], ["alone"], [limit], [adapter])
    while len(single):
        single.step()
    return single.finished["alone"]


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "prefix-cached"])
def test_rows_joining_and_leaving_a_running_batch_decode_as_each_alone(cached, one_torch_thread):
    """Continuous batching: rows join between steps (one by one, or several at once after their
    cached prefixes) on different adapter versions and with different token limits, and leave at
    their stop token or limit; every row's tokens equal its tokens decoded alone."""
    from training.decode_batch import DecodeBatch
    from training.generation import chat_input_ids, pad_token_id, stop_token_ids
    from training.prefix_cache import PrefixCache, PrefixCacheConfig
    from training.prompts import qa_messages

    model, tokenizer = sharp("llama")
    peft = with_two_versions(model)
    stop, pad = stop_token_ids(peft, tokenizer), pad_token_id(tokenizer)
    prompts = [chat_input_ids(tokenizer, qa_messages(q, p))[0] for q, p in zip(QUESTIONS, PASSAGES)]
    names, limits = ["v1", "v2", "__base__", "v1"], [12, 5, 12, 9]

    expected = [decoded_alone(peft, stop, pad, prompts[i], limits[i], names[i]) for i in range(4)]
    assert len({tuple(t) for t in expected}) == 4 and max(map(len, expected)) > 3
    cache = PrefixCache(PrefixCacheConfig()) if cached else None
    if cached:  # the later rows' prompts are in the cache: they join in one forward pass
        warm = DecodeBatch(peft, stop, pad, cache)
        warm.admit(prompts, list(range(4)), [1] * 4, names, names)
    batch = DecodeBatch(peft, stop, pad, cache)
    batch.admit([prompts[0]], [0], [limits[0]], [names[0]], [names[0]])
    for _ in range(2):
        batch.step()
    batch.admit(prompts[1:3], [1, 2], limits[1:3], names[1:3], names[1:3])
    batch.step()
    batch.admit([prompts[3]], [3], [limits[3]], [names[3]], [names[3]])
    seen = {len(batch)}
    while len(batch):
        batch.step()
        seen.add(len(batch))
    assert [batch.finished[i] for i in range(4)] == expected
    assert 4 in seen or len(expected[0]) <= 3  # all four decoded together at some step


def test_a_row_joins_in_place_of_one_that_left_and_decodes_as_alone(one_torch_thread):
    """A cached question joining a running batch after a row left is written into the running rows'
    cache buffers (no running row is copied: the buffers stay where they are), and every row's tokens
    still equal its tokens decoded alone."""
    from training.decode_batch import DecodeBatch
    from training.generation import chat_input_ids, pad_token_id, stop_token_ids
    from training.prefix_cache import PrefixCache, PrefixCacheConfig
    from training.prompts import qa_messages

    model, tokenizer = sharp("llama")
    peft = with_two_versions(model)
    stop, pad = stop_token_ids(peft, tokenizer), pad_token_id(tokenizer)
    prompts = sorted((chat_input_ids(tokenizer, qa_messages(q, p))[0] for q, p in zip(QUESTIONS, PASSAGES)),
                     key=len, reverse=True)  # the joiner, last, is the shortest: its prefix fits the running rows'
    names, limits = ["v1", "v2", "__base__", "v1"], [12, 2, 12, 9]

    expected = [decoded_alone(peft, stop, pad, prompts[i], limits[i], names[i]) for i in range(4)]
    assert len(expected[0]) > 3 and len(expected[2]) > 3 and len(expected[1]) == 2
    cache = PrefixCache(PrefixCacheConfig())
    DecodeBatch(peft, stop, pad, cache).admit(prompts, list(range(4)), [1] * 4, names, names)
    batch = DecodeBatch(peft, stop, pad, cache)
    batch.admit(prompts[:3], [0, 1, 2], limits[:3], names[:3], names[:3])
    batch.step()  # row 1 ends at its limit and leaves
    assert [row.key for row in batch.rows] == [0, 2]
    buffer = batch._layers[0][0].data_ptr()
    batch.admit([prompts[3]], [3], [limits[3]], [names[3]], [names[3]])
    batch.step()
    assert len(batch.rows) == 3 and batch._layers[0][0].data_ptr() == buffer
    while len(batch):
        batch.step()
    assert [batch.finished[i] for i in range(4)] == expected
