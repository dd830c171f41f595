"""Own positions for each memory entry a question reads: re-rotate the stored keys (RoPE).

Every entry is written at the same positions (after the prompt head, ``MAC.start`` - head =
``span`` positions per chunk), so entries read side by side overlap in position like independently
encoded passages, and interfere (squad-seq val F1 28.6 / 24.3 / 18.8 at top 1 / 2 / 4, docs/mac.md).
With rotary position embeddings a key computed at position ``p`` is ``R(p) k``, and rotations
compose: ``R(p + d) k = R(d) R(p) k``. So shifting a stored key by ``d`` positions is applying the
model's own rotary embedding at position ``d`` to it, without recomputing anything: the result
equals the key the model would have computed at ``p + d`` (tested on a tiny Llama). Values carry
no position and stay as they are. The entries of a read then occupy consecutive spans, the best
one next to the question (``read_offsets``), and the question starts after all of them.

This is the rotate-half RoPE of transformers' Llama family (``apply_rotary_pos_emb``: ``k * cos +
rotate_half(k) * sin`` with ``cos, sin = model.rotary_emb(x, positions)``, scaled by the rope type's
``attention_scaling``, which a key already carries once and must not get twice); models with
absolute positions (GPT-2) cannot be shifted this way and are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def rotary_embedding(model: PreTrainedModel) -> nn.Module:
    """The model's rotary embedding module (``LlamaModel.rotary_emb`` and its kin)."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise ValueError(f"{model.config.model_type}: re-rotating memory keys needs rotary position embeddings "
                         "(RoPE); this model has none")
    return rotary


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_keys(keys: torch.Tensor, offset: int, rotary: nn.Module) -> torch.Tensor:
    """``keys [..., head_dim]`` (post-RoPE) as if computed ``offset`` positions later (differentiable:
    training back-propagates through it to the memory tokens)."""
    if offset == 0:
        return keys
    like = keys.new_zeros(1, 1, keys.shape[-1], dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(like, torch.tensor([[offset]], device=keys.device))  # [1, 1, rotary dim]
    scaling = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    cos, sin = cos[0, 0].float() / scaling, sin[0, 0].float() / scaling
    width = cos.shape[-1]  # partial rotary: only the first ``width`` dimensions rotate
    rotated, rest = keys[..., :width].float(), keys[..., width:]
    out = rotated * cos + _rotate_half(rotated) * sin
    return torch.cat([out.to(keys.dtype), rest], dim=-1) if rest.shape[-1] else out.to(keys.dtype)


def read_offsets(n_entries: int, span: int) -> list[int]:
    """Position offset of each entry read (best first): the best one is the last span, next to
    the question; the others precede it in rank order."""
    return [(n_entries - 1 - rank) * span for rank in range(n_entries)]


def shift_entry(entry: torch.Tensor, offset: int, rotary: nn.Module) -> torch.Tensor:
    """An entry ``[layers, 2, kv_heads, slots, head_dim]`` with its keys shifted by ``offset``."""
    if offset == 0:
        return entry
    return torch.stack([shift_keys(entry[:, 0], offset, rotary), entry[:, 1]], dim=1)
