"""KIVI-style low-bit storage of key/value memory entries (Liu et al. 2024, arXiv 2402.02750).

KIVI's finding: key caches have outlier *channels* (a few head dimensions are large for every
token), value caches do not, so keys are quantized **per channel** (a group = one channel over
``key_group`` consecutive tokens) and values **per token** (a group = ``value_group`` consecutive
channels of one token). Each group is quantized asymmetrically to its bits with its own fp16 scale
and zero (its minimum): ``x ~ zero + scale * code``, codes in ``0 .. 2^bits - 1``, packed densely
(lowest bits first; 3-bit codes 8 to 3 bytes). KIVI keeps the most recent tokens in full precision
because its cache grows while decoding; a memory entry is written once, so every slot is quantized.

Keys and values may take different bits (``KiviSpec``): on MAC entries the keys are what low bits
hurt (squad-seq val answer NLL, fp16 1.933: 2-bit keys and 4-bit values 2.218, 4-bit keys and
2-bit values 1.962; docs/mac.md, "Issue 16"), so ``k4v2`` / ``k3v2`` spend the bits on the keys.

An entry is ``[layers, 2, kv_heads, slots, head_dim]`` (keys at index 0, values at 1). Bytes per
entry: ``E * (key_bits + value_bits) / 8`` for the codes (``E = layers * kv_heads * slots * head_dim``)
plus 4 bytes per group: ``layers * kv_heads * (head_dim * ceil(slots / key_group) + slots *
ceil(head_dim / value_group))`` groups. For MAC's 56-slot chunk of SmolLM2 (30 layers, 3 KV heads,
head dim 64): ``int4`` 322,560 + 86,400 = 408,960 B, ``int2`` 161,280 + 86,400 = 247,680 B (groups
of 32; fp16: 1,290,240).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

GROUP = 32  # KIVI's group size
TINY = torch.finfo(torch.float16).tiny
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # a group's half-range kept, 100 % .. 50 %


@dataclass(frozen=True)
class KiviSpec:
    """Bits and group sizes of one KIVI storage (keys per channel, values per token)."""

    key_bits: int
    value_bits: int
    key_group: int = GROUP
    value_group: int = GROUP
    clip: bool = False  # each group's range chosen for the least squared error, not its min / max

    def __post_init__(self) -> None:
        if not all(1 <= b <= 8 for b in (self.key_bits, self.value_bits)) or min(self.key_group, self.value_group) < 1:
            raise ValueError(f"KIVI storage needs 1-8 bits and positive groups, got {self}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 codes ``< 2^bits`` -> ``ceil(n * bits / 8)`` bytes (lowest bits first)."""
    per = math.lcm(bits, 8) // bits  # codes per packed word (8 / bits, or 8 for 3 bits)
    n_bytes = -(-codes.numel() * bits // 8)
    codes = F.pad(codes.reshape(-1).to(torch.int64), (0, (-codes.numel()) % per)).view(-1, per)
    words = (codes << torch.arange(0, per * bits, bits)).sum(1, keepdim=True)
    packed = (words >> torch.arange(0, per * bits, 8)) & 255
    return packed.to(torch.uint8).reshape(-1)[:n_bytes]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of ``pack_codes``' bytes."""
    per = math.lcm(bits, 8) // bits
    width = per * bits // 8  # bytes per packed word
    data = F.pad(packed.reshape(-1).to(torch.int64), (0, (-packed.numel()) % width)).view(-1, width)
    words = (data << torch.arange(0, width * 8, 8)).sum(1, keepdim=True)
    return ((words >> torch.arange(0, per * bits, bits)) & (2**bits - 1)).to(torch.uint8).reshape(-1)[:n]


def _layouts(shape: tuple[int, ...], spec: KiviSpec) -> list[tuple[int, int, int, int, int]]:
    """(rows, row length, group, groups per row, bits) of the keys (rows = channels) and values (rows = tokens)."""
    layers, two, heads, slots, dim = shape
    if two != 2:
        raise ValueError(f"KIVI storage needs key/value entries [layers, 2, kv_heads, slots, head_dim], got {shape}")
    return [(layers * heads * dim, slots, spec.key_group, -(-slots // spec.key_group), spec.key_bits),
            (layers * heads * slots, dim, spec.value_group, -(-dim // spec.value_group), spec.value_bits)]


def quantize_kv(memory: torch.Tensor, spec: KiviSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed codes uint8: keys' then values', scales fp16, zeros fp16)`` of an entry. (Keys and
    values are packed one after the other; for ``int4`` / ``int2`` entries whose key codes fill whole
    bytes, as any head dim that is a multiple of 4 makes them, that is the layout they always had.)"""
    if memory.dim() != 5:
        raise ValueError(f"KIVI storage needs key/value entries [layers, 2, kv_heads, slots, head_dim], got {tuple(memory.shape)}")
    memory = memory.detach().to("cpu", torch.float32)
    rows = [memory[:, 0].transpose(-1, -2), memory[:, 1]]  # keys [L, H, dim, slots]; values [L, H, slots, dim]
    packed, scales, zeros = [], [], []
    for x, (n_rows, length, group, groups, bits) in zip(rows, _layouts(tuple(memory.shape), spec)):
        x = x.reshape(n_rows, length)
        padded = torch.cat([x, x[:, -1:].expand(-1, groups * group - length)], 1).view(n_rows, groups, group)
        q, scale, zero = _quantize_groups(padded, bits, length, spec.clip)
        packed.append(pack_codes(q.view(n_rows, groups * group)[:, :length], bits))
        scales.append(scale.reshape(-1))
        zeros.append(zero.reshape(-1))
    return torch.cat(packed), torch.cat(scales).half(), torch.cat(zeros).half()


def _quantize_groups(padded: torch.Tensor, bits: int, length: int, clip: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zeros of ``[rows, groups, group]`` (the last group padded past ``length``).
    With ``clip``, each group's range shrinks around its middle to the ratio of ``CLIP_RATIOS``
    with the least squared error over its real values (the MSE clipping search of weight
    quantizers: at 2-3 bits one outlier otherwise spends most levels on empty range)."""
    low, high = padded.amin(-1, keepdim=True), padded.amax(-1, keepdim=True)

    def quantize(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        zero = low.half().float()  # stored in fp16: quantize against what decoding will see
        scale = ((high - zero) / (2**bits - 1)).half().float().clamp(min=TINY)
        return ((padded - zero) / scale).round().clamp(0, 2**bits - 1), scale, zero

    q, scale, zero = quantize(low, high)
    if clip:
        real = (torch.arange(padded.shape[1] * padded.shape[2]) < length).view(padded.shape[1:])  # not the padding

        def error(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
            return (((q * scale + zero - padded) ** 2) * real).sum(-1, keepdim=True)

        least, middle, half = error(q, scale, zero), (low + high) / 2, (high - low) / 2
        for ratio in CLIP_RATIOS[1:]:
            candidate = quantize(middle - ratio * half, middle + ratio * half)
            candidate_error = error(*candidate)
            better = candidate_error < least
            q, scale, zero = (torch.where(better, new, old) for new, old in zip(candidate, (q, scale, zero)))
            least = torch.minimum(candidate_error, least)
    return q.to(torch.uint8), scale, zero


def dequantize_kv(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: tuple[int, ...],
                  spec: KiviSpec) -> torch.Tensor:
    """The fp32 entry ``[layers, 2, kv_heads, slots, head_dim]`` back from ``quantize_kv``."""
    layers, _, heads, slots, dim = shape
    out, at_byte, at_group = [], 0, 0
    for n_rows, length, group, groups, bits in _layouts(tuple(shape), spec):
        n_bytes = -(-n_rows * length * bits // 8)
        codes = unpack_codes(packed[at_byte : at_byte + n_bytes], bits, n_rows * length).float()
        c = F.pad(codes.view(n_rows, length), (0, groups * group - length))
        s = scales[at_group : at_group + n_rows * groups].float().view(n_rows, groups, 1)
        z = zeros[at_group : at_group + n_rows * groups].float().view(n_rows, groups, 1)
        out.append((c.view(n_rows, groups, group) * s + z).view(n_rows, groups * group)[:, :length])
        at_byte, at_group = at_byte + n_bytes, at_group + n_rows * groups
    keys = out[0].reshape(layers, heads, dim, slots).transpose(-1, -2)
    values = out[1].reshape(layers, heads, slots, dim)
    return torch.stack([keys, values], 1).contiguous()


def kivi_bytes(shape: tuple[int, ...], spec: KiviSpec) -> int:
    """Exact stored bytes of an entry (codes + fp16 scale and zero per group)."""
    return sum(-(-rows * length * bits // 8) + 4 * rows * groups
               for rows, length, _, groups, bits in _layouts(tuple(shape), spec))
