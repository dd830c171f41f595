"""Greedy short-answer generation for many prompts at once (left-padded batches).

On a CPU, decoding one token costs about as much for 16 prompts as for one, so evaluation asks
in batches; per-request latency is measured separately with single asks.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.generation import chat_input_ids
from training.prompts import extract_answer


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    max_new_tokens: int = 24,
    batch_size: int = 16,
) -> list[str]:
    """Extracted short answers, one per chat prompt, in order."""
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
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        )
        for row, i in enumerate(chunk):
            answers[i] = extract_answer(tokenizer.decode(output[row, length:], skip_special_tokens=True))
    return answers
