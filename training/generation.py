"""Greedy short-answer generation with a chat template, shared by evaluation and the service.

Many prompts at once go in left-padded batches: on a CPU, decoding one token costs about as much
for 16 prompts as for one, so evaluation asks in batches and the service's scheduler
(``service/scheduler.py``) batches concurrent questions through the same functions. A ``StepHook``
sees every decoding step: the service streams tokens from it and stops rows whose client left,
whose deadline passed or that reached their own token limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

import torch
from transformers import DynamicCache, DynamicLayer, PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

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


def _generate_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
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
    prefill_each: bool = False,
    prefix_cache: PrefixCache | None = None,
    cache_namespaces: list[Hashable] | None = None,
    **generate_kwargs,
) -> list[str]:
    """Extracted short answers, one per chat prompt, in order. ``generate_kwargs`` go to
    ``model.generate`` (e.g. PEFT's per-row ``adapter_names``, one per prompt, in prompt order).
    ``deadline`` (a ``time.monotonic()`` value) ends decoding there: ``GenerationTimeout``.
    ``on_step``: see ``StepHook``. ``prefill_each``: prefill the prompts one by one and report each
    first token at once (``_prefill_rows``), then decode them together: on a CPU prefill is most of
    a short answer's cost, so a streamed batch's first tokens come out one by one instead of all
    after the whole batch's prefill; the total work is the same. ``prefix_cache``: each prompt's
    prefill starts after the longest prefix of it cached under its namespace (``cache_namespaces``,
    one per prompt, default ``None``), and leaves its own prefix there (implies ``prefill_each``)."""
    encoded = [chat_input_ids(tokenizer, messages)[0] for messages in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths together
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = [""] * len(encoded)
    per_row = {k: v for k, v in generate_kwargs.items() if k == "adapter_names" and isinstance(v, list)}
    stop_ids = _generate_stop_ids(model, tokenizer) if on_step is not None else set()
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
        if prefill_each or prefix_cache is not None:
            spaces = [cache_namespaces[i] if cache_namespaces else None for i in chunk]
            texts = _prefill_then_decode(model, tokenizer, [encoded[i] for i in chunk], chunk, max_new_tokens, pad,
                                         criteria, on_step, stop, kwargs, prefix_cache, spaces)
        else:
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


def _prefill_then_decode(model, tokenizer, rows: list[torch.Tensor], indices: list[int], max_new_tokens: int,
                         pad: int, criteria: list, on_step: StepHook | None, stop: Deadline | None,
                         kwargs: dict, prefix_cache: PrefixCache | None = None,
                         namespaces: list[Hashable] | None = None) -> list[str]:
    """Each row's prompt through the model alone (exactly the unbatched computation; after its
    cached prefix if ``prefix_cache`` has one), its first token reported at once; then the rows'
    caches, left-padded to one length, continue as one batch in ``model.generate`` (positions from
    the attention mask, so padding changes nothing)."""
    stop_ids = _generate_stop_ids(model, tokenizer)
    device = model.device
    per_row = {k: v for k, v in kwargs.items() if k == "adapter_names"}
    shared = {k: v for k, v in kwargs.items() if k not in per_row}
    first, caches, ended = [], [], []
    for row, ids in enumerate(rows):
        start, cache = prefix_cache.lookup(namespaces[row], ids.tolist()) if prefix_cache else (0, None)
        ids = ids[None].to(device)
        out = model(input_ids=ids[:, start:], attention_mask=torch.ones_like(ids), past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **{k: [v[row]] for k, v in per_row.items()})
        token = int(out.logits[0, -1].argmax())
        first.append(token)
        caches.append(out.past_key_values)
        if prefix_cache is not None:
            prefix_cache.store(namespaces[row], ids[0].tolist(), out.past_key_values)
        done = token in stop_ids
        if on_step is not None:
            done |= indices[row] in on_step({indices[row]: None if done else token})
        if stop is not None and stop(ids, None).all():
            done = True
        ended.append(done)
    generated = [[t] for t in first]
    if max_new_tokens > 1 and not all(ended):
        length = max(len(ids) for ids in rows)
        cache = DynamicCache()
        cache.layers = [_RoomyLayer.left_padded([(c.layers[layer].keys, c.layers[layer].values) for c in caches],
                                                length, room=max_new_tokens)
                        for layer in range(len(caches[0].layers))]
        input_ids = torch.full((len(rows), length + 1), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(rows):
            input_ids[row, length - len(ids):length] = ids
            input_ids[row, length] = first[row]
            attention[row, length - len(ids):] = 1
        hook = next((c for c in criteria if isinstance(c, _HookCriteria)), None)
        if hook is not None:
            hook.ended |= torch.tensor(ended, dtype=torch.bool, device=hook.ended.device)
        done_rows = _EndedRows(ended)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), past_key_values=cache,
            max_new_tokens=max_new_tokens - 1, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([done_rows, *criteria]), **shared, **per_row,
        )
        for row in range(len(rows)):
            generated[row] += output[row, length + 1:].tolist()
    texts = []
    for tokens in generated:
        cut = next((n for n, t in enumerate(tokens) if t in stop_ids), len(tokens))
        texts.append(tokenizer.decode(tokens[:cut], skip_special_tokens=True))
    return texts


class _RoomyLayer(DynamicLayer):
    """A cache layer with room for the tokens still to come: each step writes into it instead of
    concatenating the whole cache again (``DynamicLayer`` copies every row's key/values at every
    step: ~40 ms of a ~160 ms step for 8 rows of ~220 tokens, SmolLM2-135M, one CPU thread)."""

    @classmethod
    def left_padded(cls, rows: list[tuple[torch.Tensor, torch.Tensor]], length: int, room: int) -> _RoomyLayer:
        """The rows' key/values (each ``[1, heads, tokens, dim]``) right-aligned at ``length``
        (zeros before: masked out), with ``room`` free positions after."""
        layer = cls()
        k0, v0 = rows[0]
        layer._keys = k0.new_zeros(len(rows), k0.shape[1], length + room, k0.shape[3])
        layer._values = v0.new_zeros(len(rows), v0.shape[1], length + room, v0.shape[3])
        for row, (k, v) in enumerate(rows):
            layer._keys[row, :, length - k.shape[2]:length] = k[0]
            layer._values[row, :, length - v.shape[2]:length] = v[0]
        layer.keys, layer.values = layer._keys[:, :, :length], layer._values[:, :, :length]
        layer.device, layer.is_initialized = k0.device, True
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._keys.shape[-2]:  # out of room (never, for the tokens it was sized for)
            return super().update(key_states, value_states)
        self._keys[:, :, n:n + m] = key_states
        self._values[:, :, n:n + m] = value_states
        self.keys, self.values = self._keys[:, :, :n + m], self._values[:, :, :n + m]
        return self.keys, self.values


class _EndedRows(StoppingCriteria):
    """Rows that ended at their first token stop at once in ``generate`` (it did not see that token)."""

    def __init__(self, ended: list[bool]) -> None:
        self.ended = ended

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor(self.ended, dtype=torch.bool, device=input_ids.device)
