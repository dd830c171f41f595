"""The memory bank: one entry per document (a MAC memory entry), kept, read by id, deleted exactly.

``MemoryBank`` is the interface the evaluation harness and the service write through; the
implementations are ``in_memory.InMemoryMemoryBank`` (the harness) and
``redis_bank.RedisMemoryBank`` (the service). Entries come back as fp32; how they are stored is
the bank's ``storage`` (each stored entry records its own, so a bank switched to another storage
keeps reading what it wrote before):

* ``float16``: half the bytes of fp32, no measurable loss;
* ``int8``: one fp16 scale (absmax / 127) per vector of the last axis, ~52 % of fp16 for MAC's
  64-value slot vectors (squad-seq val F1 21.44 vs 22.55 in fp16, docs/mac.md);
* ``int4`` / ``int2``: KIVI (``kivi.py``): keys per channel, values per token, groups of 32 with
  an fp16 scale and zero, codes packed into bytes: 32 % / 19 % of fp16 for a MAC chunk;
* ``k4v2`` / ``k3v2``: KIVI with 4- / 3-bit keys and 2-bit values (the keys are what low bits hurt),
  groups of 64 and least-squares ranges: 22 % / 19 % of fp16 for a MAC chunk (``KIVI_SPECS``).
  The KIVI storages are only for key/value entries ``[layers, 2, kv_heads, slots, head_dim]``.

Deleting an entry is exact: the document's memory is gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from training.memory.kivi import KiviSpec, dequantize_kv, quantize_kv

Storage = Literal["float16", "int8", "int4", "int2", "k4v2", "k3v2"]
STORAGES: tuple[str, ...] = get_args(Storage)
KIVI_SPECS: dict[str, KiviSpec] = {
    "int4": KiviSpec(4, 4),
    "int2": KiviSpec(2, 2),
    "k4v2": KiviSpec(4, 2, 64, 64, clip=True),
    "k3v2": KiviSpec(3, 2, 64, 64, clip=True),
}


def check_storage(storage: str) -> Storage:
    """``storage`` if a bank can store entries that way (so a bad setting fails at start, not at the first put)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown memory storage {storage!r} ({', '.join(STORAGES)})")
    return storage


@dataclass
class EncodedEntry:
    """What a bank stores for an entry: its storage, shape, and payload parts (``memory``, and
    ``scale`` / ``zero`` for the quantized storages)."""

    storage: Storage
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


# dtype of each stored part, per storage (how a bank reads the bytes back)
PART_DTYPES: dict[str, dict[str, torch.dtype]] = {
    "float16": {"memory": torch.float16},
    "int8": {"memory": torch.int8, "scale": torch.float16},
    **{kivi: {"memory": torch.uint8, "scale": torch.float16, "zero": torch.float16} for kivi in KIVI_SPECS},
}


def encode_entry(memory: torch.Tensor, storage: Storage = "float16") -> EncodedEntry:
    """Quantize an entry for storage (see the module docstring)."""
    memory = memory.detach().to("cpu", torch.float32)
    shape = tuple(memory.shape)
    storage = check_storage(storage)
    if storage == "float16":
        return EncodedEntry(storage, shape, {"memory": memory.half()})
    if storage == "int8":
        scale = (memory.abs().amax(-1, keepdim=True) / 127).half().float().clamp(min=torch.finfo(torch.float16).tiny)
        codes = (memory / scale).round().clamp(-127, 127).to(torch.int8)
        return EncodedEntry(storage, shape, {"memory": codes, "scale": scale.half()})
    packed, scale, zero = quantize_kv(memory, KIVI_SPECS[storage])
    return EncodedEntry(storage, shape, {"memory": packed, "scale": scale, "zero": zero})


def decode_entry(entry: EncodedEntry) -> torch.Tensor:
    """The fp32 entry back from what ``encode_entry`` stored."""
    parts = entry.parts
    if entry.storage == "float16":
        return parts["memory"].float().reshape(entry.shape)
    if entry.storage == "int8":
        return (parts["memory"].float().reshape(entry.shape) * parts["scale"].float().reshape(*entry.shape[:-1], 1))
    return dequantize_kv(parts["memory"], parts["scale"], parts["zero"], entry.shape, KIVI_SPECS[entry.storage])


@runtime_checkable
class MemoryBank(Protocol):
    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        """Store (or replace) a document's memory tokens ``[n_tokens, hidden]`` and an optional
        retrieval key ``[dim]`` used for top-k pre-selection."""

    def get(self, doc_ids: list[str]) -> list[torch.Tensor | None]:
        """Memory tokens per id (``None`` where absent), in the order asked."""

    def delete(self, doc_id: str) -> bool:
        """Remove an entry; ``True`` if it existed."""

    def ids(self) -> list[str]: ...

    def keys(self) -> tuple[list[str], torch.Tensor | None]:
        """Ids that have a retrieval key and the keys stacked ``[n, dim]`` (``None`` if empty)."""

    def __len__(self) -> int: ...

    def __contains__(self, doc_id: object) -> bool: ...

    def clear(self) -> None: ...

    def nbytes(self, doc_id: str) -> int:
        """Bytes the entry occupies in storage (memory + key payloads)."""
