"""Greedy short-answer generation with a chat template, shared by evaluation and the service.

Many prompts at once go in batches: on a CPU, a decoding step costs about as much for several rows
as for one (the weights are read once per step). ``generate_answers`` runs ``model.generate`` over
left-padded batches (the harness's prompting baselines); ``decode_prompts`` runs prompts through a
``training.decode_batch.DecodeBatch``, the decoder of the service's scheduler, which also serves
the answer pipeline (``training.pipeline.generate``). A ``StepHook`` sees every decoding step: the
service streams tokens from it and stops rows whose client left or whose deadline passed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from training.decode_batch import DecodeBatch
from training.prefix_cache import PrefixCache
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


StepHook = Callable[[dict[int, int | None]], set[int]]
"""Called after each decoding step with the new token of each row of the running batch, keyed by
the prompt's index in the call (``None``: the row ended, at a stop token or earlier); returns the
indices of rows to stop now. A stopped row's answer is what it generated so far."""


class _HookCriteria(StoppingCriteria):
    """Adapts a ``StepHook`` to ``model.generate``: rows map to prompt indices, a row that produced a
    stop token (or was stopped) reports ``None`` from then on."""

    def __init__(self, hook: StepHook, indices: list[int], stop_ids: set[int], device) -> None:
        self.hook, self.indices = hook, indices
        self.stop = torch.tensor(sorted(stop_ids), device=device)
        self.ended = torch.zeros(len(indices), dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, -1]
        self.ended |= torch.isin(new, self.stop)
        tokens = {i: (None if ended else int(t)) for i, t, ended in zip(self.indices, new.tolist(), self.ended.tolist())}
        stopped = self.hook(tokens)
        halt = torch.tensor([i in stopped for i in self.indices], dtype=torch.bool, device=input_ids.device)
        self.ended |= halt
        return halt


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids ``model.generate`` ends a row at: the generation config's EOS, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


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
    on_step: StepHook | None = None,
    prefix_cache: PrefixCache | None = None,
    cache_namespaces: list[Hashable] | None = None,
    **generate_kwargs,
) -> list[str]:
    """Extracted short answers, one per chat prompt, in order. ``generate_kwargs`` go to
    ``model.generate`` (e.g. PEFT's per-row ``adapter_names``, one per prompt, in prompt order).
    ``deadline`` (a ``time.monotonic()`` value) ends decoding there: ``GenerationTimeout``.
    ``on_step``: see ``StepHook``. With a ``prefix_cache`` the prompts go through ``decode_prompts``
    (the service's decoder) instead of ``model.generate`` in left-padded batches: each prompt's
    prefill starts after the longest prefix of it cached under its namespace (``cache_namespaces``,
    one per prompt, default ``None``)."""
    encoded = [chat_input_ids(tokenizer, messages)[0] for messages in prompts]
    if prefix_cache is not None:
        return decode_prompts(model, tokenizer, encoded, max_new_tokens, deadline, on_step, prefix_cache,
                              cache_namespaces, **generate_kwargs)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together
    pad = pad_token_id(tokenizer)
    answers: list[str] = [""] * len(encoded)
    per_row = {k: v for k, v in generate_kwargs.items() if k == "adapter_names" and isinstance(v, list)}
    stop_ids = stop_token_ids(model, tokenizer) if on_step is not None else set()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = max(len(encoded[i]) for i in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(chunk):
            input_ids[row, length - len(encoded[i]) :] = encoded[i]
            attention[row, length - len(encoded[i]) :] = 1
        stop = Deadline(deadline) if deadline is not None else None
        criteria = [stop] if stop else []
        if on_step is not None:
            criteria.append(_HookCriteria(on_step, chunk, stop_ids, model.device))
        kwargs = {**generate_kwargs, **{k: [v[i] for i in chunk] for k, v in per_row.items()}}
        output = model.generate(
            input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
            max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList(criteria), **kwargs,
        )
        texts = [tokenizer.decode(output[row, length:], skip_special_tokens=True) for row in range(len(chunk))]
        if stop is not None:
            stop.check()
        for text, i in zip(texts, chunk):
            answers[i] = extract_answer(text)
    return answers


@torch.no_grad()
def decode_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[torch.Tensor],
                   max_new_tokens: int, deadline: float | None = None, on_step: StepHook | None = None,
                   prefix_cache: PrefixCache | None = None, cache_namespaces: list[Hashable] | None = None,
                   adapter_names: list[str] | None = None) -> list[str]:
    """Extracted short answers to prompts given as token ids, decoded together through a
    ``DecodeBatch`` (what the service's scheduler runs): each prefilled after its cached prefix,
    each first token reported as soon as it exists, then one step at a time for all. ``deadline``,
    ``on_step``: as ``generate_answers``."""
    batch = DecodeBatch(model, stop_token_ids(model, tokenizer), pad_token_id(tokenizer), prefix_cache)
    indices, stopped, hit = list(range(len(prompts))), set(), False

    def report(tokens: dict[int, int | None]) -> None:
        nonlocal hit
        if on_step is not None:
            stopped.update(on_step(tokens))
        if deadline is not None and time.monotonic() >= deadline:
            hit = True
            stopped.update(indices)

    batch.admit(prompts, indices, [max_new_tokens] * len(prompts), adapter_names, cache_namespaces,
                on_first=lambda key, token: report({key: token}))
    batch.drop(stopped)
    while len(batch):
        report(batch.step())
        batch.drop(stopped)
    if hit:
        raise GenerationTimeout("generation reached its deadline")
    return [extract_answer(tokenizer.decode(batch.finished[i], skip_special_tokens=True)) for i in indices]
