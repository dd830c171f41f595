"""The in-process memory bank (the evaluation harness's): a dict with the Redis bank's storage codec."""

from __future__ import annotations

import torch

from training.memory.base import EncodedEntry, Storage, check_storage, decode_entry, encode_entry
from training.memory.key_index import KeyIndex


class InMemoryMemoryBank:
    """A dict-backed bank with the same storage precision as the Redis one."""

    def __init__(self, storage: Storage = "float16") -> None:
        self.storage = check_storage(storage)
        self._memory: dict[str, EncodedEntry] = {}
        self._keys: dict[str, torch.Tensor] = {}
        self.index = KeyIndex()

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        self._memory[doc_id] = encode_entry(memory, self.storage)
        if key is not None:
            self._keys[doc_id] = key.detach().to("cpu", torch.float16).clone()
            self.index.add([doc_id], self._keys[doc_id].float().numpy()[None])
        else:
            self._keys.pop(doc_id, None)
            self.index.remove([doc_id])

    def get(self, doc_ids: list[str]) -> list[torch.Tensor | None]:
        return [decode_entry(m) if (m := self._memory.get(i)) is not None else None for i in doc_ids]

    def search(self, query_key: torch.Tensor, k: int) -> list[str]:
        """Ids of the k entries whose keys are closest to ``query_key`` (cosine), best first."""
        return self.index.search(query_key.detach().cpu().float().numpy(), k, self.exact_keys)

    def exact_keys(self, doc_ids: list[str]) -> list:
        """The keys of ``doc_ids`` (None for an id without one)."""
        return [key.numpy() if (key := self._keys.get(i)) is not None else None for i in doc_ids]

    def delete(self, doc_id: str) -> bool:
        self._keys.pop(doc_id, None)
        self.index.remove([doc_id])
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
        self.index.clear()

    def nbytes(self, doc_id: str) -> int:
        entry, key = self._memory.get(doc_id), self._keys.get(doc_id)
        return (entry.nbytes() if entry is not None else 0) + (key.numel() * key.element_size() if key is not None else 0)
