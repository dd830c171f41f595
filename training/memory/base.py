"""The memory bank: one entry per document (a MAC memory entry), kept, read by id, deleted exactly.

``MemoryBank`` is the interface the evaluation harness and the service write through; the
implementations are ``in_memory.InMemoryMemoryBank`` (the harness) and
``redis_bank.RedisMemoryBank`` (the service). Entries are stored as fp16 (half the bytes of fp32, no measurable loss) or, with
``storage="int8"``, as int8 with one fp16 scale per vector of the last axis (about half the bytes
of fp16 for MAC's 64-value slot vectors; squad-seq val F1 21.44 vs 22.55 in fp16, docs/mac.md), and
come back as fp32. Deleting an entry is exact: the document's memory is gone.
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args, runtime_checkable

import torch

Storage = Literal["float16", "int8"]
STORAGES: tuple[str, ...] = get_args(Storage)


def check_storage(storage: str) -> Storage:
    """``storage`` if a bank can store entries that way (so a bad setting fails at start, not at the first put)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown memory storage {storage!r} ({' or '.join(STORAGES)})")
    return storage


def encode_entry(memory: torch.Tensor, storage: Storage = "float16") -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a bank stores for an entry: fp16 values, or int8 values and their fp16 scales
    ``[..., 1]`` (absmax / 127 of each last-axis vector)."""
    memory = memory.detach().to("cpu", torch.float32)
    if check_storage(storage) == "float16":
        return memory.half(), None
    scale = (memory.abs().amax(-1, keepdim=True) / 127).half().float().clamp(min=torch.finfo(torch.float16).tiny)
    return (memory / scale).round().clamp(-127, 127).to(torch.int8), scale.half()


def decode_entry(values: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 entry back from what ``encode_entry`` stored."""
    return values.float() if scale is None else values.float() * scale.float()


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
