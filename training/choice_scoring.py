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
    adapter_name: str | None = None,
) -> list[float]:
    """Mean log-probability per token of each choice after the prompt.

    The prompt is run once; its KV cache is repeated for the choices, which are scored together
    in one right-padded batch (the prompt dominates the cost of a multiple-choice question).
    ``adapter_name``: score through that PEFT adapter for this request only (``adapter_names``).
    """
    prompt = chat_input_ids(tokenizer, messages).to(model.device)
    targets = [answer_token_ids(tokenizer, c) for c in choices]

    def per_request(rows: int) -> dict:
        return {} if adapter_name is None else {"adapter_names": [adapter_name] * rows}

    out = model(input_ids=prompt, use_cache=True, **per_request(1))
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # predicts each choice's 1st token
    n, longest = len(targets), max(len(t) for t in targets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    choice_ids = torch.full((n, longest), pad, dtype=torch.long, device=model.device)
    choice_mask = torch.zeros((n, longest), dtype=torch.long, device=model.device)
    for i, target in enumerate(targets):
        choice_ids[i, : len(target)] = torch.tensor(target)
        choice_mask[i, : len(target)] = 1
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    attention = torch.cat([torch.ones((n, prompt.shape[1]), dtype=torch.long, device=model.device),
                           choice_mask], dim=1)
    logits = model(input_ids=choice_ids, attention_mask=attention, past_key_values=cache, **per_request(n)).logits
    rest = torch.log_softmax(logits.float(), dim=-1)  # position j predicts choice token j + 1
    scores = []
    for i, target in enumerate(targets):
        token_lp = [first[target[0]]] + [rest[i, j, target[j + 1]] for j in range(len(target) - 1)]
        scores.append(torch.stack(token_lp).mean().item())
    return scores
