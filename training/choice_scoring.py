"""Multiple-choice answering by likelihood: each choice is scored as the model's reply to the
question, by its mean per-token log-probability (length-normalised, so long choices are not
penalised for having more tokens), and the best-scoring choice is the prediction."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.generation import chat_input_ids


def answer_token_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """The tokens of an assistant reply ``answer`` as the chat template ends it (answer + EOS)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


@torch.no_grad()
def choice_logprobs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    choices: list[str] | tuple[str, ...],
) -> list[float]:
    """Mean log-probability per token of each choice after the prompt, in one padded batch."""
    prompt = chat_input_ids(tokenizer, messages)[0].tolist()
    targets = [answer_token_ids(tokenizer, c) for c in choices]
    length = len(prompt) + max(len(t) for t in targets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(targets), length), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, target in enumerate(targets):
        row = prompt + target
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
    logits = model(input_ids=input_ids.to(model.device),
                   attention_mask=attention.to(model.device)).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    scores = []
    for i, target in enumerate(targets):
        start = len(prompt) - 1  # logits at position t predict token t + 1
        positions = torch.arange(start, start + len(target), device=logprobs.device)
        token_lp = logprobs[i, positions, torch.tensor(target, device=logprobs.device)]
        scores.append(token_lp.mean().item())
    return scores
