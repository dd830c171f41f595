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


TOGETHER_TOKENS = 64
"""Rows whose uncached prompt tails are all at most this long prefill as one batch: a forward pass
over a few tokens per row costs about one read of the weights whatever the batch (SmolLM2-135M on
a CPU: ~85 ms for one row, ~2x that for eight), while a long tail costs its tokens' compute either
way, and prefilling those one by one lets each row's first token out as soon as its own prompt is done."""


def _prefill_then_decode(model, tokenizer, rows: list[torch.Tensor], indices: list[int], max_new_tokens: int,
                         pad: int, criteria: list, on_step: StepHook | None, stop: Deadline | None,
                         kwargs: dict, prefix_cache: PrefixCache | None = None,
                         namespaces: list[Hashable] | None = None) -> list[str]:
    """The rows' prompts through the model, each after its prefix cached in ``prefix_cache`` (if
    any): as one batch when every uncached tail is short (``TOGETHER_TOKENS``), else one row at a
    time (exactly the unbatched computation), each row's first token reported at once; then the
    rows decode as one batch in ``model.generate`` over one cache in which each row's positions
    come from its attention mask, so padding changes nothing."""
    stop_ids = _generate_stop_ids(model, tokenizer)
    cached = [prefix_cache.cached_length(namespaces[row], ids.tolist()) if prefix_cache else 0
              for row, ids in enumerate(rows)]
    if len(rows) > 1 and max(len(ids) - start for ids, start in zip(rows, cached)) <= TOGETHER_TOKENS:
        hits = [prefix_cache.lookup(namespaces[row], ids.tolist()) if prefix_cache else (0, None)
                for row, ids in enumerate(rows)]
        first, cache, input_ids, attention = _prefill_together(model, rows, hits, max_new_tokens, pad, kwargs)
        if prefix_cache is not None:
            for row, ids in enumerate(rows):
                if prefix_cache.holds(namespaces[row], ids.tolist()):
                    continue
                keep = attention[row, :-1].bool()  # this row's positions in the batch cache
                prefix_cache.store(namespaces[row], ids.tolist(),
                                   [(layer.keys[row:row + 1, :, keep], layer.values[row:row + 1, :, keep])
                                    for layer in cache.layers])
    else:
        first, cache, input_ids, attention = _prefill_one_by_one(model, rows, max_new_tokens, pad, kwargs,
                                                                 prefix_cache, namespaces)
    ended = []
    for row, token in enumerate(first):
        done = token in stop_ids
        if on_step is not None:
            done |= indices[row] in on_step({indices[row]: None if done else token})
        if stop is not None and stop(input_ids, None).all():
            done = True
        ended.append(done)
    generated = [[t] for t in first]
    if max_new_tokens > 1 and not all(ended):
        hook = next((c for c in criteria if isinstance(c, _HookCriteria)), None)
        if hook is not None:
            hook.ended |= torch.tensor(ended, dtype=torch.bool, device=hook.ended.device)
        device, length = model.device, input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), past_key_values=cache,
            max_new_tokens=max_new_tokens - 1, do_sample=False, pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([_EndedRows(ended), *criteria]), **kwargs,
        )
        for row in range(len(rows)):
            generated[row] += output[row, length:].tolist()
    texts = []
    for tokens in generated:
        cut = next((n for n, t in enumerate(tokens) if t in stop_ids), len(tokens))
        texts.append(tokenizer.decode(tokens[:cut], skip_special_tokens=True))
    return texts


def _prefill_one_by_one(model, rows, max_new_tokens, pad, kwargs, prefix_cache, namespaces):
    """Each row alone after its cached prefix, leaving its own prefix for the next rows; the caches
    left-padded into one. Returns the first tokens, the cache, and the decode inputs (each row's
    prompt and first token, left-padded)."""
    adapter_names = kwargs.get("adapter_names")
    first, caches = [], []
    for row, ids in enumerate(rows):
        start, cache = prefix_cache.lookup(namespaces[row], ids.tolist()) if prefix_cache else (0, None)
        ids = ids[None].to(model.device)
        extra = {"adapter_names": [adapter_names[row]]} if adapter_names else {}
        out = model(input_ids=ids[:, start:], attention_mask=torch.ones_like(ids), past_key_values=cache,
                    use_cache=True, logits_to_keep=1, **extra)
        first.append(int(out.logits[0, -1].argmax()))
        caches.append(out.past_key_values)
        if prefix_cache is not None and not prefix_cache.holds(namespaces[row], ids[0].tolist()):
            prefix_cache.store(namespaces[row], ids[0].tolist(),
                               [(layer.keys, layer.values) for layer in out.past_key_values.layers])
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
    return first, cache, input_ids, attention


def _prefill_together(model, rows, hits, max_new_tokens, pad, kwargs):
    """All rows' uncached tails in one forward pass. Each row's cached prefix sits right-aligned in
    the first ``P`` positions of the batch cache and its tail right-aligned in the next ``S``; the
    gaps are masked and the positions given explicitly, so each row sees only its own tokens at its
    own positions. Returns what ``_prefill_one_by_one`` does, in this layout."""
    starts = [start for start, _ in hits]
    P, S = max(starts), max(len(ids) - start for ids, start in zip(rows, starts))
    template = next((c for _, c in hits if c is not None), None)
    input_ids = torch.full((len(rows), P + S + 1), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    positions = torch.zeros((len(rows), S), dtype=torch.long)
    for row, (ids, start) in enumerate(zip(rows, starts)):
        tail = len(ids) - start
        input_ids[row, P - start:P], input_ids[row, P + S - tail:P + S] = ids[:start], ids[start:]
        attention[row, P - start:P] = attention[row, P + S - tail:P + S + 1] = 1
        positions[row, S - tail:] = torch.arange(start, len(ids))
    cache = None
    if template is not None:
        cache = DynamicCache()
        cache.layers = [
            _RoomyLayer.left_padded([(c.layers[layer].keys, c.layers[layer].values) if c is not None else
                                     (template.layers[layer].keys[:, :, :0], template.layers[layer].values[:, :, :0])
                                     for _, c in hits], P, room=S + max_new_tokens)
            for layer in range(len(template.layers))]
    device = model.device
    out = model(input_ids=input_ids[:, P:P + S].to(device), attention_mask=attention[:, :P + S].to(device),
                position_ids=positions.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1,
                **{k: v for k, v in kwargs.items() if k == "adapter_names"})
    first = out.logits[:, -1].argmax(-1).tolist()
    if cache is None:  # no row had a cached prefix: give the decode steps room to write into
        cache = DynamicCache()
        cache.layers = [_RoomyLayer.left_padded([(layer.keys[row:row + 1], layer.values[row:row + 1])
                                                 for row in range(len(rows))], S, room=max_new_tokens)
                        for layer in out.past_key_values.layers]
    input_ids[:, P + S] = torch.tensor(first)
    return first, cache, input_ids, attention


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
