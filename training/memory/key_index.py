"""The retrieval keys of a memory bank held in process, so a question's top-k does not read every
key from the bank's store (the Redis bank read all of them, one ``HGET`` per entry, per question).

Exact cosine top-k over a matrix of L2-normalised keys held in float16 (the precision both banks
store keys in: at 100,000 entries x 384 dimensions 77 MB instead of float32's 154 MB), scored in
float32 a block of rows at a time so no float32 copy of the matrix is ever made. One search at
100,000 entries is a few tens of milliseconds on one core; an approximate index (HNSW: usearch,
faiss) would buy little here and add a dependency; the class is the place to swap one in at larger
scale. Rows freed by a remove are reused, and the matrix grows by a quarter at a time, so its
capacity stays close to the number of keys.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np
import torch

_BLOCK = 4096  # rows scored per matrix-vector product: a 6 MB float32 block at 384 dimensions
_MIN_ROWS = 256


class KeyIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._matrix: torch.Tensor | None = None  # [capacity, dim] float16
        self._live = torch.zeros(0, dtype=torch.bool)  # rows that hold a key
        self._ids: list[str | None] = []
        self._row: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row

    def ids(self) -> list[str]:
        return list(self._row)

    def nbytes(self) -> int:
        """Bytes of the key matrix (its capacity)."""
        return 0 if self._matrix is None else self._matrix.numel() * self._matrix.element_size()

    def clear(self) -> None:
        with self._lock:
            self._matrix, self._ids, self._row, self._free = None, [], {}, []
            self._live = torch.zeros(0, dtype=torch.bool)

    def add(self, ids: Iterable[str], keys: np.ndarray) -> None:
        """Insert or replace ``ids`` with their keys ``[n, dim]`` (normalised here)."""
        keys = torch.as_tensor(np.asarray(keys, dtype=np.float32)).reshape(len(ids := list(ids)), -1)
        keys = (keys / keys.norm(dim=1, keepdim=True).clamp_min(1e-12)).half()
        with self._lock:
            rows = []
            for doc_id in ids:
                row = self._row.get(doc_id)
                if row is None:
                    row = self._take_row(keys.shape[1])
                    self._row[doc_id] = row
                    self._ids[row] = doc_id
                rows.append(row)
            if rows:
                index = torch.tensor(rows)
                self._matrix[index] = keys
                self._live[index] = True

    def _take_row(self, dim: int) -> int:
        if self._free:
            return self._free.pop()
        row = len(self._ids)
        self._ids.append(None)
        capacity = 0 if self._matrix is None else len(self._matrix)
        if row >= capacity:
            grown = max(_MIN_ROWS, capacity + capacity // 4)
            matrix = torch.zeros(grown, dim, dtype=torch.float16)
            live = torch.zeros(grown, dtype=torch.bool)
            if self._matrix is not None:
                matrix[:capacity], live[:capacity] = self._matrix, self._live
            self._matrix, self._live = matrix, live
        return row

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            for doc_id in ids:
                row = self._row.pop(doc_id, None)
                if row is not None:
                    self._matrix[row] = 0
                    self._live[row] = False
                    self._ids[row] = None
                    self._free.append(row)

    def search(self, query: np.ndarray, k: int) -> list[str]:
        """Ids of the (at most) k keys with the highest cosine to ``query``, best first."""
        with self._lock:
            if not self._row or k <= 0:
                return []
            n = len(self._ids)
            q = torch.as_tensor(np.asarray(query, dtype=np.float32)).reshape(-1)
            q = q.half().float()  # scored as the keys are held, so a stored key is its own best match
            scores = torch.empty(n)
            for start in range(0, n, _BLOCK):
                scores[start : start + _BLOCK] = self._matrix[start : min(start + _BLOCK, n)].float() @ q
            scores[~self._live[:n]] = -torch.inf
            k = min(k, len(self._row))
            top = torch.topk(scores, k).indices.tolist()
            return [self._ids[i] for i in top]
