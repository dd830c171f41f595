"""P-tuning v2 prefixes: a modulation becomes per-layer key/values of a frozen causal LM.

Works for any Hugging Face decoder through the cache API, the way PEFT's prefix tuning does:
the prefix is put into a ``DynamicCache`` as if it were ``P`` already-processed tokens. Keys are
injected as they are (no rotary rotation: the prefix has no position), with the model's number of
key/value heads (GQA) and head dim. The real tokens get explicit ``position_ids`` that start at 0
(``cumsum`` of their mask, so left padding is fine), hence models with absolute learned positions
(GPT-2) see the same positions as without a prefix; the attention mask is
``[prefix mask, token mask]`` and the causal offset comes from the cache length.

Every QA prompt starts with the same tokens (chat template + system prompt, ~45 of ~70 prompt
tokens for SmolLM2). A ``PromptHead`` holds their key/values, computed once *without* the prefix;
the cache is then ``[MAC prefix, head]`` and only the question's own tokens are run, which halves
the base model's work per question in training and at ask time. The head tokens do not see the
prefix (they are the same for every question anyway); every later token sees both.
"""

from __future__ import annotations

import torch
from torch import nn
from dataclasses import dataclass

from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, kv_heads, P, head_dim]


def kv_geometry(config: PretrainedConfig) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder config (Llama, GPT-2, Qwen, Mistral, ...)."""
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


class PrefixProjection(nn.Module):
    """MLP reparameterisation (P-tuning v2): ``[B, P, dim]`` -> per-layer prefix keys/values."""

    def __init__(self, dim: int, base_config: PretrainedConfig, bottleneck: int) -> None:
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = kv_geometry(base_config)
        self.net = nn.Sequential(
            nn.Linear(dim, bottleneck),
            nn.Tanh(),
            nn.Linear(bottleneck, self.layers * 2 * self.kv_heads * self.head_dim),
        )

    def forward(self, modulation: torch.Tensor) -> PrefixKV:
        batch, length, _ = modulation.shape
        kv = self.net(modulation).view(batch, length, self.layers, 2, self.kv_heads, self.head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # layers, k/v, B, kv_heads, P, head_dim
        return [(layer[0], layer[1]) for layer in kv]


@dataclass(frozen=True)
class PromptHead:
    """Key/values of the token prefix all prompts share, computed once without a MAC prefix."""

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
    model: PreTrainedModel, batch: int, prefix: PrefixKV | None, head: PromptHead | None
) -> DynamicCache:
    """A fresh cache ``[prefix, head]`` for ``batch`` rows (the model appends to it: never reuse)."""
    dtype = model.get_input_embeddings().weight.dtype
    layers = []
    for layer in range(model.config.get_text_config(decoder=True).num_hidden_layers):
        parts = []
        if prefix is not None:
            parts.append(prefix[layer])
        if head is not None:
            k, v = head.kv[layer]
            parts.append((k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)))
        layers.append((torch.cat([p[0].to(dtype) for p in parts], dim=2),
                       torch.cat([p[1].to(dtype) for p in parts], dim=2)))
    return DynamicCache(layers, config=model.config)


def prefix_cache(model: PreTrainedModel, prefix: PrefixKV) -> DynamicCache:
    """A fresh cache holding the prefix (the model appends to it, so never reuse one)."""
    return build_cache(model, prefix[0][0].shape[0], prefix, None)


def token_positions(attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Positions of the real tokens counted from ``start`` regardless of left padding."""
    return start + (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _context(
    batch: int, prefix: PrefixKV | None, prefix_mask: torch.Tensor | None, head: PromptHead | None,
    like: torch.Tensor,
) -> torch.Tensor:
    """Attention-mask columns of the cached part: the prefix (``prefix_mask`` or ones), the head."""
    parts = []
    if prefix is not None:
        length = prefix[0][0].shape[2]
        parts.append(prefix_mask.to(like.dtype) if prefix_mask is not None
                     else torch.ones(batch, length, dtype=like.dtype, device=like.device))
    if head is not None:
        parts.append(torch.ones(batch, len(head), dtype=like.dtype, device=like.device))
    return torch.cat(parts, dim=1) if parts else like[:, :0]


def prefixed_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: PrefixKV | None,
    prefix_mask: torch.Tensor | None = None,
    head: PromptHead | None = None,
    **kwargs,
):
    """Forward pass of the (frozen) model under a prefix; ``input_ids`` continue ``head`` when one
    is given. Returns the model output with its cache. Extra keyword arguments (e.g.
    ``logits_to_keep``) go to the model."""
    positions = token_positions(attention_mask, len(head) if head is not None else 0)
    if prefix is None and head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
    batch = input_ids.shape[0]
    return model(
        input_ids=input_ids,
        attention_mask=torch.cat([_context(batch, prefix, prefix_mask, head, attention_mask), attention_mask], 1),
        position_ids=positions,
        past_key_values=build_cache(model, batch, prefix, head),
        use_cache=True,
        **kwargs,
    )


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    prefix: PrefixKV | None,
    *,
    pad_id: int,
    stop_ids: set[int],
    max_new_tokens: int = 24,
    head: PromptHead | None = None,
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch under a prefix (``generate`` would restart positions
    at the cache length, which is wrong for absolute-position models). ``prompts`` continue
    ``head`` when one is given."""
    device = model.device
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    if prefix is None and head is None:
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=token_positions(mask), use_cache=True)
    else:
        out = prefixed_forward(model, input_ids, mask, prefix, head=head)
    full_mask = torch.cat([_context(len(prompts), prefix, None, head, mask), mask], dim=1)
    positions = token_positions(mask, len(head) if head is not None else 0)
    generated: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(stop_ids), device=device)
    for _ in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(-1)
        for row in (~done).nonzero().flatten().tolist():
            if not torch.isin(next_ids[row], stop):
                generated[row].append(int(next_ids[row]))
        done |= torch.isin(next_ids, stop)
        if done.all():
            break
        positions = positions[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
        out = model(input_ids=next_ids[:, None], attention_mask=full_mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return generated
