"""Memory as key/values of a frozen causal LM, put in front of a prompt through the cache API.

A memory entry is a set of *slots*: per layer, key/value vectors the base model itself computed
(``amortizer.py``), so the model reads them with its own attention. The cache of a question is
``[prompt head, memory]``: the head is the token prefix every QA prompt shares (chat template +
system prompt, ~45 of ~70 prompt tokens for SmolLM2), computed once; the memory slots follow it, as
the document followed it when it was encoded; the question's own tokens come last, with explicit
``position_ids`` from ``start`` (``cumsum`` of their mask, so left padding is fine). Keys keep the
rotation of the position they were computed at, so ``start`` must lie after every slot's position
(``MAC.start``). Works for any Hugging Face decoder (GQA, rotary or absolute positions): the
attention mask is ``[head, memory mask, token mask]`` and the causal offset is the cache length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

from training.generation import GenerationTimeout, StepHook

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, kv_heads, P, head_dim]


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config (Llama, GPT-2, Qwen, Mistral, ...)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


@dataclass(frozen=True)
class PromptHead:
    """Key/values of the token prefix all prompts share, computed once."""

    ids: tuple[int, ...]
    kv: PrefixKV  # per layer [1, kv_heads, S, head_dim]

    def __len__(self) -> int:
        return len(self.ids)


@torch.no_grad()
def encode_head(model: PreTrainedModel, ids: list[int]) -> PromptHead | None:
    if not ids:
        return None
    out = model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    kv = [(layer.keys.detach(), layer.values.detach()) for layer in out.past_key_values.layers]
    return PromptHead(tuple(ids), kv)


def build_cache(
    model: PreTrainedModel, batch: int, memory: PrefixKV | None, head: PromptHead | None
) -> DynamicCache:
    """A fresh cache ``[head, memory]`` for ``batch`` rows (the model appends to it: never reuse)."""
    dtype = model.get_input_embeddings().weight.dtype
    layers = []
    for layer in range(model.config.get_text_config(decoder=True).num_hidden_layers):
        parts = []
        if head is not None:
            k, v = head.kv[layer]
            parts.append((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
        if memory is not None:
            parts.append(memory[layer])
        layers.append((torch.cat([p[0].to(dtype) for p in parts], dim=2),
                       torch.cat([p[1].to(dtype) for p in parts], dim=2)))
    return DynamicCache(layers, config=model.config)


def token_positions(attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Positions of the real tokens counted from ``start`` regardless of left padding."""
    return start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _context(
    batch: int, memory: PrefixKV | None, memory_mask: torch.Tensor | None, head: PromptHead | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """Attention-mask columns of the cached part: the head, then the memory (``memory_mask`` or ones)."""
    parts = []
    if head is not None:
        parts.append(torch.ones(batch, len(head), dtype=like.dtype, device=like.device))
    if memory is not None:
        length = memory[0][0].shape[2]
        parts.append(memory_mask.to(like.dtype) if memory_mask is not None
                     else torch.ones(batch, length, dtype=like.dtype, device=like.device))
    return torch.cat(parts, dim=1) if parts else like[:, :0]


def default_start(memory: PrefixKV | None, head: PromptHead | None) -> int:
    return (len(head) if head is not None else 0) + (memory[0][0].shape[2] if memory is not None else 0)


def prefixed_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    memory: PrefixKV | None,
    memory_mask: torch.Tensor | None = None,
    head: PromptHead | None = None,
    start: int | None = None,
    **kwargs,
):
    """Forward pass of the (frozen) model after ``[head, memory]``; the tokens' positions start at
    ``start`` (default: right after the cached part). Extra keyword arguments (e.g.
    ``logits_to_keep``) go to the model."""
    positions = token_positions(attention_mask, default_start(memory, head) if start is None else start)
    if memory is None and head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **kwargs)
    batch = input_ids.shape[0]
    return model(
        input_ids=input_ids,
        attention_mask=torch.cat([_context(batch, memory, memory_mask, head, attention_mask), attention_mask], 1),
        position_ids=positions,
        past_key_values=build_cache(model, batch, memory, head),
        use_cache=True,
        **kwargs,
    )


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    memory: PrefixKV | None,
    *,
    pad_id: int,
    stop_ids: set[int],
    max_new_tokens: int = 24,
    head: PromptHead | None = None,
    memory_mask: torch.Tensor | None = None,
    start: int | None = None,
    deadline: float | None = None,
    on_step: StepHook | None = None,
    token_logprobs: list[list[float]] | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch after ``[head, memory]`` (``generate`` would restart
    positions at the cache length, which is wrong for absolute-position models and for memory
    slots that keep their own positions). ``prompts`` continue ``head`` when one is given.
    ``deadline`` (a ``time.monotonic()`` value) ends decoding there: ``GenerationTimeout``.
    ``on_step``: see ``training.generation.StepHook`` (rows keyed by prompt index).
    ``token_logprobs``: one list per prompt, filled with the log-probability of each token the row
    chose (its stop token included: a finished answer is part of what the model predicts)."""
    device = model.device
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    start = default_start(memory, head) if start is None else start
    out = prefixed_forward(model, input_ids, mask, memory, memory_mask, head=head, start=start)
    full_mask = torch.cat([_context(len(prompts), memory, memory_mask, head, mask), mask], dim=1)
    positions = token_positions(mask, start)
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    for _ in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)
        if token_logprobs is not None:
            chosen = out.logits[:, -1].float().log_softmax(-1).gather(1, next_ids[:, None])[:, 0].tolist()
            for row in (~done).nonzero().flatten().tolist():
                token_logprobs[row].append(chosen[row])
        for row in (~done).nonzero().flatten().tolist():
            if not torch.isin(next_ids[row], stop):
                generated[row].append(int(next_ids[row]))
        if on_step is not None:
            ended = done | torch.isin(next_ids, stop)
            stopped = on_step({row: None if ended[row] else int(next_ids[row]) for row in range(len(prompts))})
            done |= torch.tensor([row in stopped for row in range(len(prompts))], dtype=torch.bool, device=device)
        done |= torch.isin(next_ids, stop)
        if done.all():
            break
        if deadline is not None and time.monotonic() >= deadline:
            raise GenerationTimeout("generation reached its deadline")
        positions = positions[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
        out = model(input_ids=next_ids[:, None], attention_mask=full_mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return generated
