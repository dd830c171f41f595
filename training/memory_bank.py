"""The memory bank: one entry of MAC memory tokens per document.

``MemoryBank`` is the interface both the evaluation harness and the service write through. This
module has the in-process implementation; ``service.memory_bank.RedisMemoryBank`` is the
production one. Entries are stored as fp16 (half the bytes, no measurable loss for modulations)
and come back as fp32. Deleting an entry is exact: the document's memory is gone.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


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


class InMemoryMemoryBank:
    """A dict-backed bank with the same storage precision as the Redis one."""

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        self.dtype = dtype
        self._memory: dict[str, torch.Tensor] = {}
        self._keys: dict[str, torch.Tensor] = {}

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        self._memory[doc_id] = memory.detach().to("cpu", self.dtype).clone()
        if key is not None:
            self._keys[doc_id] = key.detach().to("cpu", self.dtype).clone()
        else:
            self._keys.pop(doc_id, None)

    def get(self, doc_ids: list[str]) -> list[torch.Tensor | None]:
        return [m.float() if (m := self._memory.get(i)) is not None else None for i in doc_ids]

    def delete(self, doc_id: str) -> bool:
        self._keys.pop(doc_id, None)
        return self._memory.pop(doc_id, None) is not None

    def ids(self) -> list[str]:
        return list(self._memory)

    def keys(self) -> tuple[list[str], torch.Tensor | None]:
        ids = list(self._keys)
        return ids, torch.stack([self._keys[i] for i in ids]).float() if ids else None

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._memory

    def clear(self) -> None:
        self._memory.clear()
        self._keys.clear()

    def nbytes(self, doc_id: str) -> int:
        key = self._keys.get(doc_id)
        mem = self._memory.get(doc_id)
        return sum(t.numel() * t.element_size() for t in (mem, key) if t is not None)
