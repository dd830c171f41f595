"""Greedy short-answer generation with a chat template, shared by evaluation and the service."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.prompts import extract_answer


def chat_input_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> torch.Tensor:
    """Token ids of the messages under the model's chat template, ready for generation."""
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


@torch.no_grad()
def generate_answer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    max_new_tokens: int = 24,
    **generate_kwargs,
) -> str:
    """Greedy-decode a reply and return the extracted short answer."""
    input_ids = chat_input_ids(tokenizer, messages).to(model.device)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **generate_kwargs,
    )
    return extract_answer(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
