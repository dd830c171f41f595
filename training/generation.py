"""Greedy short-answer generation with a chat template, shared by evaluation and the service.

Many prompts at once go in left-padded batches: on a CPU, decoding one token costs about as much
for 16 prompts as for one, so evaluation asks in batches; per-request latency is measured with
single asks.
"""

from __future__ import annotations

import time

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from training.prompts import extract_answer


class GenerationTimeout(TimeoutError):
    """Generation was stopped at its deadline (the service answers 504)."""


class Deadline(StoppingCriteria):
    """Stops ``generate`` once ``time.monotonic()`` passes ``at``; ``hit`` says whether it did."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.hit = False

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.hit = time.monotonic() >= self.at
        return torch.full((input_ids.shape[0],), self.hit, dtype=torch.bool, device=input_ids.device)

    def check(self) -> None:
        if self.hit:
            raise GenerationTimeout("generation reached its deadline")


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids of the messages under the model's chat template, ready for generation."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def generate_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_new_tokens: int = 24,
    **generate_kwargs,
) -> str:
    """Greedy-decode one reply and return the extracted short answer."""
    return generate_answers(model, tokenizer, [messages], max_new_tokens, **generate_kwargs)[0]


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 24,
    batch_size: int = 16,
    deadline: float | None = None,
    **generate_kwargs,
) -> list[str]:
    """Extracted short answers, one per chat prompt, in order. ``generate_kwargs`` go to
    ``model.generate`` (e.g. PEFT's per-row ``adapter_names``, one per prompt of a batch).
    ``deadline`` (a ``time.monotonic()`` value) ends decoding there: ``GenerationTimeout``."""
    encoded = [chat_input_ids(tokenizer, messages)[0] for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, length - len(encoded[i]) :] = encoded[i]
            attention[row, length - len(encoded[i]) :] = 1
        stop = Deadline(deadline) if deadline is not None else None
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([stop] if stop else []), **generate_kwargs,
        )
        if stop is not None:
            stop.check()
        for row, i in enumerate(chunk):
            answers[i] = extract_answer(tokenizer.decode(output[row, length:], skip_special_tokens=True))
    return answers


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def generate_answers_shared_prefix(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 24,
    min_shared_fraction: float = 0.6,
) -> list[str]:
    """Like ``generate_answers``, but prompts that share most of their tokens (several questions
    about one long context) pay for that context once: its KV cache is computed once and copied
    for each question. On a CPU, prefill of the context dominates the cost of such prompts."""
    import copy

    encoded = [chat_input_ids(tokenizer, messages)[0].tolist() for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: encoded[i])  # same contexts become neighbours
    groups: list[tuple[list[int], int]] = []  # (members, shared prefix length)
    for i in order:
        if groups:
            members, shared = groups[-1]
            first = encoded[members[0]]
            common = min(shared, _common_prefix_length(first, encoded[i]))
            if common >= min_shared_fraction * min(len(first), len(encoded[i])):
                groups[-1] = (members + [i], common)
                continue
        groups.append(([i], len(encoded[i])))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(encoded)
    for members, shared in groups:
        prefix_length = min(shared, min(len(encoded[i]) for i in members) - 1)  # leave >= 1 token
        prefix_cache = None
        if len(members) > 1 and prefix_length > 0:
            prefix = torch.tensor([encoded[members[0]][:prefix_length]], device=model.device)
            prefix_cache = model(input_ids=prefix, use_cache=True).past_key_values
        for i in members:
            input_ids = torch.tensor([encoded[i]], device=model.device)
            output = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                past_key_values=copy.deepcopy(prefix_cache) if prefix_cache is not None else None,
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            )
            answers[i] = extract_answer(
                tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return answers
