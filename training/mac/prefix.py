"""P-tuning v2 prefixes: a modulation becomes per-layer key/values of a frozen causal LM.

Works for any Hugging Face decoder through the cache API, the way PEFT's prefix tuning does:
the prefix is put into a ``DynamicCache`` as if it were ``P`` already-processed tokens. Keys are
injected as they are (no rotary rotation: the prefix has no position), with the model's number of
key/value heads (GQA) and head dim. The real tokens get explicit ``position_ids`` that start at 0
(``cumsum`` of their mask, so left padding is fine), hence models with absolute learned positions
(GPT-2) see the same positions as without a prefix; the attention mask is
``[prefix mask, token mask]`` and the causal offset comes from the cache length.
"""

from __future__ import annotations

import torch
from torch import nn
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


def prefix_cache(model: PreTrainedModel, prefix: PrefixKV) -> DynamicCache:
    """A fresh cache holding the prefix (the model appends to it, so never reuse one)."""
    dtype = model.get_input_embeddings().weight.dtype
    return DynamicCache([(k.to(dtype), v.to(dtype)) for k, v in prefix], config=model.config)


def token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of the real tokens counted from 0 regardless of left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prefixed_forward(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prefix: PrefixKV | None,
    prefix_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Forward pass of the (frozen) model under a prefix; returns the model output with its cache.
    Extra keyword arguments (e.g. ``logits_to_keep``) go to the model."""
    positions = token_positions(attention_mask)
    if prefix is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, **kwargs)
    batch, length = prefix[0][0].shape[0], prefix[0][0].shape[2]
    if prefix_mask is None:
        prefix_mask = torch.ones(batch, length, dtype=attention_mask.dtype, device=attention_mask.device)
    return model(
        input_ids=input_ids,
        attention_mask=torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1),
        position_ids=positions,
        past_key_values=prefix_cache(model, prefix),
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
) -> list[list[int]]:
    """Greedy decoding of a left-padded batch under a prefix (``generate`` would restart positions
    at the cache length, which is wrong for absolute-position models)."""
    device = model.device
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        mask[row, length - len(prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    if prefix is not None:
        p_len = prefix[0][0].shape[2]
        full_mask = torch.cat([torch.ones(len(prompts), p_len, dtype=torch.long, device=device), mask], 1)
        cache = prefix_cache(model, prefix)
    else:
        full_mask, cache = mask, DynamicCache(config=model.config)
    positions = token_positions(mask)
    out = model(input_ids=input_ids, attention_mask=full_mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
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
