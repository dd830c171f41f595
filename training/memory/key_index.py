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
matrix, and a search of one XOR + popcount pass. The ids sit beside the codes as fixed-width
UTF-8 bytes with a 64-bit hash each (no Python string or dict entry per key, which took ~170 bytes
per key): 6.8 MB for 100,000 keys with 10-character ids, codes included.

Rows freed by a remove are reused, and the arrays grow by a quarter at a time, so their capacity
stays close to the number of keys.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np

_MIN_ROWS = 256
_SCAN_IDS = 16  # up to this many ids are looked up by a scan each; more by one sort of the live hashes
RESCORE = 256  # keys rescored exactly per search: measured to give the exact top-1 (see above)
# ids -> their exact keys (any float dtype), None for an id whose key is gone
ExactKeys = Callable[[list[str]], list[np.ndarray | None]]


def sign_codes(keys: np.ndarray) -> np.ndarray:
    """One bit per dimension (``> 0``), packed and padded to whole 64-bit words: ``[n, words]`` uint64."""
    bits = np.packbits(np.asarray(keys) > 0, axis=1)
    bits = np.pad(bits, ((0, 0), (0, -bits.shape[1] % 8)))
    return np.ascontiguousarray(bits).view(np.uint64)


def _hashes(doc_ids: list[str]) -> np.ndarray:
    """A 64-bit hash per id (Python's, stable within a process: the index lives in one)."""
    return np.array([hash(doc_id) & 0xFFFF_FFFF_FFFF_FFFF for doc_id in doc_ids], dtype=np.uint64)


class KeyIndex:
    """Codes, ids and id hashes in row-aligned numpy arrays: no Python object per key. An id is
    found from its 64-bit hash (a sorted search over the live rows' hashes, then the stored bytes
    compared), so a MiniLM key costs 48 + 1 + 8 bytes plus the longest id's UTF-8 length (the id
    array is fixed-width)."""

    def __init__(self, rescore: int = RESCORE) -> None:
        self.rescore = rescore
        self._lock = threading.Lock()
        self._codes: np.ndarray | None = None  # [capacity, words] uint64
        self._live = np.zeros(0, dtype=bool)  # rows that hold a key
        self._hashes = np.zeros(0, dtype=np.uint64)  # each row's id hash
        self._names = np.zeros(0, dtype="S1")  # each row's id, UTF-8, fixed width (grown as needed)
        self._used = 0  # rows handed out so far (live or freed)
        self._count = 0
        self._free: list[int] = []

    def __len__(self) -> int:
        return self._count

    def __contains__(self, doc_id: object) -> bool:
        return isinstance(doc_id, str) and self._rows_of([doc_id])[0] >= 0

    def ids(self) -> list[str]:
        return [name.decode() for name in self._names[: self._used][self._live[: self._used]]]

    def nbytes(self) -> int:
        """Bytes of the index's arrays (codes, ids and their hashes, at capacity)."""
        codes = 0 if self._codes is None else self._codes.nbytes
        return codes + self._live.nbytes + self._hashes.nbytes + self._names.nbytes

    def clear(self) -> None:
        with self._lock:
            self._codes, self._used, self._count, self._free = None, 0, 0, []
            self._live, self._hashes = np.zeros(0, dtype=bool), np.zeros(0, dtype=np.uint64)
            self._names = np.zeros(0, dtype="S1")

    def _rows_of(self, doc_ids: list[str]) -> np.ndarray:
        """The live row of each id, -1 for an id not in the index."""
        out = np.full(len(doc_ids), -1, dtype=np.int64)
        if not self._count or not doc_ids:
            return out
        hashes = _hashes(doc_ids)
        if len(doc_ids) <= _SCAN_IDS:  # a few ids (a put, a delete): one vectorised scan each
            for j, (doc_id, h) in enumerate(zip(doc_ids, hashes)):
                out[j] = self._row_named(np.flatnonzero(self._hashes[: self._used] == h), doc_id)
            return out
        live = np.flatnonzero(self._live[: self._used])
        table = self._hashes[live]
        order = np.argsort(table, kind="stable")
        ordered = table[order]
        left, right = np.searchsorted(ordered, hashes, "left"), np.searchsorted(ordered, hashes, "right")
        for j in np.flatnonzero(right > left):
            out[j] = self._row_named(live[order[left[j] : right[j]]], doc_ids[j])
        return out

    def _row_named(self, rows: np.ndarray, doc_id: str) -> int:
        """The live row among ``rows`` (those whose hash matches) that holds ``doc_id``, else -1."""
        name = doc_id.encode()
        return next((int(row) for row in rows if self._live[row] and self._names[row] == name), -1)

    def add(self, ids: Iterable[str], keys: np.ndarray) -> None:
        """Insert or replace ``ids`` with the codes of their keys ``[n, dim]``."""
        ids = list(ids)
        codes = sign_codes(np.asarray(keys, dtype=np.float32).reshape(len(ids), -1))
        if not ids:
            return
        names = [doc_id.encode() for doc_id in ids]
        with self._lock:
            rows = self._rows_of(ids)
            new: dict[str, int] = {}  # ids new to the index, by their row (an id twice in ``ids``: one row)
            for j, doc_id in enumerate(ids):
                if rows[j] < 0:
                    if doc_id not in new:
                        new[doc_id] = self._take_row(codes.shape[1])
                    rows[j] = new[doc_id]
            width = max(len(name) for name in names)
            if width > self._names.dtype.itemsize:
                self._names = self._names.astype(f"S{width}")
            self._codes[rows] = codes
            self._live[rows] = True
            self._hashes[rows] = _hashes(ids)
            self._names[rows] = names
            self._count += len(new)

    def _take_row(self, words: int) -> int:
        if self._free:
            return self._free.pop()
        row = self._used
        self._used += 1
        capacity = 0 if self._codes is None else len(self._codes)
        if row >= capacity:
            grown = max(_MIN_ROWS, capacity + capacity // 4)
            codes = np.zeros((grown, words), dtype=np.uint64)
            live, hashes = np.zeros(grown, dtype=bool), np.zeros(grown, dtype=np.uint64)
            names = np.zeros(grown, dtype=self._names.dtype)
            if self._codes is not None:
                codes[:capacity], live[:capacity] = self._codes, self._live
                hashes[:capacity], names[:capacity] = self._hashes, self._names
            self._codes, self._live, self._hashes, self._names = codes, live, hashes, names
        return row

    def remove(self, ids: Iterable[str]) -> None:
        ids = list(ids)
        with self._lock:
            rows = sorted({int(r) for r in self._rows_of(ids) if r >= 0})
            for row in rows:
                self._codes[row] = 0
                self._live[row] = False
                self._hashes[row], self._names[row] = 0, b""
                self._free.append(row)
            self._count -= len(rows)

    def candidates(self, query: np.ndarray, count: int) -> list[str]:
        """Ids of the (at most) ``count`` keys nearest to ``query`` in Hamming distance of their codes."""
        with self._lock:
            if not self._count or count <= 0:
                return []
            n = self._used
            distance = np.bitwise_count(self._codes[:n] ^ sign_codes(np.asarray(query, np.float32).reshape(1, -1)))
            distance = distance.sum(axis=1, dtype=np.int32)
            distance[~self._live[:n]] = np.iinfo(np.int32).max
            count = min(count, self._count)
            rows = np.argpartition(distance, count - 1)[:count] if count < n else np.arange(n)
            return [self._names[r].decode() for r in rows if self._live[r]]

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
