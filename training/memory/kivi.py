"""KIVI-style low-bit storage of key/value memory entries (Liu et al. 2024, arXiv 2402.02750).

KIVI's finding: key caches have outlier *channels* (a few head dimensions are large for every
token), value caches do not, so keys are quantized **per channel** (a group = one channel over
``group`` consecutive tokens) and values **per token** (a group = ``group`` consecutive channels
of one token). Each group is quantized asymmetrically to ``bits`` bits with its own fp16 scale and
zero (its minimum): ``x ~ zero + scale * code``, codes in ``0 .. 2^bits - 1``, packed
``8 / bits`` to a byte. KIVI keeps the most recent tokens in full precision because its cache
grows while decoding; a memory entry is written once, so every slot is quantized.

An entry is ``[layers, 2, kv_heads, slots, head_dim]`` (keys at index 0, values at 1). Bytes per
entry: ``2 * E * bits / 8`` for the codes (``E = layers * kv_heads * slots * head_dim``) plus 4
bytes per group: ``layers * kv_heads * (head_dim * ceil(slots / group) + slots * ceil(head_dim / group))``
groups. For MAC's 56-slot chunk of SmolLM2 (30 layers, 3 KV heads, head dim 64, group 32):
322,560 + 86,400 = 408,960 B at 4 bits, 161,280 + 86,400 = 247,680 B at 2 bits (fp16: 1,290,240).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

GROUP = 32  # KIVI's group size
TINY = torch.finfo(torch.float16).tiny


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes ``< 2^bits`` -> ``ceil(n * bits / 8)`` bytes (lowest bits first)."""
    per = 8 // bits
    codes = F.pad(codes.reshape(-1).to(torch.uint8), (0, (-codes.numel()) % per)).view(-1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (codes << shifts).sum(1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``pack_codes``' bytes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return ((packed.reshape(-1, 1) >> shifts) & (2**bits - 1)).reshape(-1)[:n]


def _layouts(shape: tuple[int, ...], group: int) -> list[tuple[int, int, int]]:
    """(rows, row length, groups per row) of the keys (rows = channels) and values (rows = tokens)."""
    layers, two, heads, slots, dim = shape
    if two != 2:
        raise ValueError(f"KIVI storage needs key/value entries [layers, 2, kv_heads, slots, head_dim], got {shape}")
    return [(layers * heads * dim, slots, -(-slots // group)), (layers * heads * slots, dim, -(-dim // group))]


def quantize_kv(memory: torch.Tensor, bits: int, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed codes uint8, scales fp16, zeros fp16)`` of an entry: keys per channel, values per token."""
    if bits not in (2, 4):
        raise ValueError("KIVI storage is 2 or 4 bits")
    if memory.dim() != 5:
        raise ValueError(f"KIVI storage needs key/value entries [layers, 2, kv_heads, slots, head_dim], got {tuple(memory.shape)}")
    memory = memory.detach().to("cpu", torch.float32)
    rows = [memory[:, 0].transpose(-1, -2), memory[:, 1]]  # keys [L, H, dim, slots]; values [L, H, slots, dim]
    codes, scales, zeros = [], [], []
    for x, (n_rows, length, groups) in zip(rows, _layouts(tuple(memory.shape), group)):
        x = x.reshape(n_rows, length)
        padded = torch.cat([x, x[:, -1:].expand(-1, groups * group - length)], 1).view(n_rows, groups, group)
        low, high = padded.amin(-1, keepdim=True), padded.amax(-1, keepdim=True)
        zero = low.half().float()  # stored in fp16: quantize against what decoding will see
        scale = ((high - zero) / (2**bits - 1)).half().float().clamp(min=TINY)
        q = ((padded - zero) / scale).round().clamp(0, 2**bits - 1).to(torch.uint8)
        codes.append(q.view(n_rows, groups * group)[:, :length].reshape(-1))
        scales.append(scale.reshape(-1))
        zeros.append(zero.reshape(-1))
    return pack_codes(torch.cat(codes), bits), torch.cat(scales).half(), torch.cat(zeros).half()


def dequantize_kv(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: tuple[int, ...],
                  bits: int, group: int = GROUP) -> torch.Tensor:
    """The fp32 entry ``[layers, 2, kv_heads, slots, head_dim]`` back from ``quantize_kv``."""
    layers, _, heads, slots, dim = shape
    layouts = _layouts(tuple(shape), group)
    codes = unpack_codes(packed, bits, sum(r * n for r, n, _ in layouts)).float()
    out, at_code, at_group = [], 0, 0
    for n_rows, length, groups in layouts:
        c = F.pad(codes[at_code : at_code + n_rows * length].view(n_rows, length), (0, groups * group - length))
        s = scales[at_group : at_group + n_rows * groups].float().view(n_rows, groups, 1)
        z = zeros[at_group : at_group + n_rows * groups].float().view(n_rows, groups, 1)
        out.append((c.view(n_rows, groups, group) * s + z).view(n_rows, groups * group)[:, :length])
        at_code, at_group = at_code + n_rows * length, at_group + n_rows * groups
    keys = out[0].reshape(layers, heads, dim, slots).transpose(-1, -2)
    values = out[1].reshape(layers, heads, slots, dim)
    return torch.stack([keys, values], 1).contiguous()


def kivi_bytes(shape: tuple[int, ...], bits: int, group: int = GROUP) -> int:
    """Exact stored bytes of an entry (codes + fp16 scale and zero per group)."""
    layouts = _layouts(tuple(shape), group)
    codes = sum(r * n for r, n, _ in layouts)
    return -(-codes * bits // 8) + 4 * sum(r * g for r, _, g in layouts)
