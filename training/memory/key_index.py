"""The retrieval keys of a memory bank held in process, so a question's top-k does not read every
key from the bank's store (the Redis bank read all of them, one ``HGET`` per entry, per question).

The index holds one *sign bit* per key dimension (48 bytes for MiniLM's 384, against 768 for the
fp16 key: binary quantization, as in the "Binary and Scalar Embedding Quantization" write-up of
Sentence Transformers), ranks every key by Hamming distance to the query's bits, and rescores the
``rescore`` nearest with their exact keys, which the caller reads from the bank (``exact_keys``:
the Redis bank's keys hash, one ``HMGET``). A bank of at most ``rescore`` keys is searched
exactly. Measured on MiniLM keys of all 2,067 SQuAD dev paragraphs and 4,123 questions, the
rescored top-1 equals the exact one for 99.85 % of questions with 64 rescored and 100 % with 128;
the default rescores 256. What this buys at 100,000 keys: 4.8 MB of codes instead of a 77 MB fp16
matrix, and a search of one XOR + popcount pass; the ids (a string and a dict entry each) are
still held here, so a process's RSS still grows a little with the bank (docs/BENCHMARKS.md).

Rows freed by a remove are reused, and the code matrix grows by a quarter at a time, so its
capacity stays close to the number of keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np

_MIN_ROWS = 256
RESCORE = 256  # keys rescored exactly per search: measured to give the exact top-1 (see above)
# ids -> their exact keys (any float dtype), None for an id whose key is gone
ExactKeys = Callable[[list[str]], list[np.ndarray | None]]


def sign_codes(keys: np.ndarray) -> np.ndarray:
    """One bit per dimension (``> 0``), packed and padded to whole 64-bit words: ``[n, words]`` uint64."""
    bits = np.packbits(np.asarray(keys) > 0, axis=1)
    bits = np.pad(bits, ((0, 0), (0, -bits.shape[1] % 8)))
    return np.ascontiguousarray(bits).view(np.uint64)


class KeyIndex:
    def __init__(self, rescore: int = RESCORE) -> None:
        self.rescore = rescore
        self._lock = threading.Lock()
        self._codes: np.ndarray | None = None  # [capacity, words] uint64
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

    def nbytes(self) -> int:
        """Bytes of the code matrix (its capacity)."""
        return 0 if self._codes is None else self._codes.nbytes

    def clear(self) -> None:
        with self._lock:
            self._codes, self._ids, self._row, self._free = None, [], {}, []
            self._live = np.zeros(0, dtype=bool)

    def add(self, ids: Iterable[str], keys: np.ndarray) -> None:
        """Insert or replace ``ids`` with the codes of their keys ``[n, dim]``."""
        ids = list(ids)
        codes = sign_codes(np.asarray(keys, dtype=np.float32).reshape(len(ids), -1))
        with self._lock:
            rows = []
            for doc_id in ids:
                row = self._row.get(doc_id)
                if row is None:
                    row = self._take_row(codes.shape[1])
                    self._row[doc_id] = row
                    self._ids[row] = doc_id
                rows.append(row)
            if rows:
                self._codes[rows] = codes
                self._live[rows] = True

    def _take_row(self, words: int) -> int:
        if self._free:
            return self._free.pop()
        row = len(self._ids)
        self._ids.append(None)
        capacity = 0 if self._codes is None else len(self._codes)
        if row >= capacity:
            grown = max(_MIN_ROWS, capacity + capacity // 4)
            codes, live = np.zeros((grown, words), dtype=np.uint64), np.zeros(grown, dtype=bool)
            if self._codes is not None:
                codes[:capacity], live[:capacity] = self._codes, self._live
            self._codes, self._live = codes, live
        return row

    def remove(self, ids: Iterable[str]) -> None:
        with self._lock:
            for doc_id in ids:
                row = self._row.pop(doc_id, None)
                if row is not None:
                    self._codes[row] = 0
                    self._live[row] = False
                    self._ids[row] = None
                    self._free.append(row)

    def candidates(self, query: np.ndarray, count: int) -> list[str]:
        """Ids of the (at most) ``count`` keys nearest to ``query`` in Hamming distance of their codes."""
        with self._lock:
            if not self._row or count <= 0:
                return []
            n = len(self._ids)
            distance = np.bitwise_count(self._codes[:n] ^ sign_codes(np.asarray(query, np.float32).reshape(1, -1)))
            distance = distance.sum(axis=1, dtype=np.int32)
            distance[~self._live[:n]] = np.iinfo(np.int32).max
            count = min(count, len(self._row))
            rows = np.argpartition(distance, count - 1)[:count] if count < n else np.arange(n)
            return [self._ids[r] for r in rows if self._live[r]]

    def search(self, query: np.ndarray, k: int, exact_keys: ExactKeys) -> list[str]:
        """Ids of the (at most) k keys with the highest cosine to ``query``, best first: the
        ``max(rescore, k)`` nearest codes rescored with their exact keys (ties in id order)."""
        ids = self.candidates(query, max(self.rescore, k))
        if not ids:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        q = q.astype(np.float16).astype(np.float32)  # scored as keys are stored: a stored key is its own best match
        found = [(doc_id, key) for doc_id, key in zip(ids, exact_keys(ids)) if key is not None]
        if not found:
            return []
        matrix = np.stack([np.asarray(key, dtype=np.float32).reshape(-1) for _, key in found])
        scores = matrix @ q / np.maximum(np.linalg.norm(matrix, axis=1), 1e-12)
        order = np.lexsort((np.array([doc_id for doc_id, _ in found]), -scores))
        return [found[i][0] for i in order[:k]]
