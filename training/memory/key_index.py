"""The retrieval keys of a memory bank held in process, so a question's top-k does not read every
key from the bank's store (the Redis bank read all of them, one ``HGET`` per entry, per question).

Exact cosine top-k over a numpy matrix of L2-normalised keys (rows reused after a remove): at
100,000 entries x 384 dimensions one matrix-vector product is ~40 M multiply-adds, a few
milliseconds on one core, so an approximate index (HNSW: usearch, faiss) would buy little here and
add a dependency; the class is the place to swap one in at larger scale.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np


class KeyIndex:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._matrix: np.ndarray | None = None  # [capacity, dim]
        self._live = np.zeros(0, dtype=bool)  # rows that hold a key
        self._ids: list[str | None] = []
        self._row: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._row

    def ids(self) -> list[str]:
        return list(self._row)

    def clear(self) -> None:
        with self._lock:
            self._matrix, self._ids, self._row, self._free = None, [], {}, []
            self._live = np.zeros(0, dtype=bool)

    def add(self, ids: Iterable[str], keys: np.ndarray) -> None:
        """Insert or replace ``ids`` with their keys ``[n, dim]`` (normalised here)."""
        keys = np.asarray(keys, dtype=np.float32).reshape(len(ids := list(ids)), -1)
        keys = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        with self._lock:
            for doc_id, key in zip(ids, keys):
                row = self._row.get(doc_id)
                if row is None:
                    row = self._take_row(key.shape[0])
                    self._row[doc_id] = row
                    self._ids[row] = doc_id
                self._matrix[row] = key
                self._live[row] = True

    def _take_row(self, dim: int) -> int:
        if self._matrix is None:
            self._matrix = np.zeros((256, dim), dtype=np.float32)
            self._live = np.zeros(256, dtype=bool)
        if self._free:
            return self._free.pop()
        row = len(self._ids)
        self._ids.append(None)
        if row >= len(self._matrix):
            self._matrix = np.concatenate([self._matrix, np.zeros_like(self._matrix)])
            self._live = np.concatenate([self._live, np.zeros_like(self._live)])
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
            scores = self._matrix[:n] @ np.asarray(query, dtype=np.float32).reshape(-1)
            live = self._live[:n]
            scores[~live] = -np.inf
            k = min(k, len(self._row))
            top = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
            top = top[np.argsort(-scores[top], kind="stable")]
            return [self._ids[i] for i in top if live[i]][:k]
