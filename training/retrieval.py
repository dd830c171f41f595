"""BM25 retrieval over passages of documents (the `rag_bm25` method and the service's `rag`).

The index is updated in place: adding or removing a document costs that document's passages, not
the corpus, so the service keeps one index per tenant current as documents are ingested and
deleted instead of rebuilding it (rebuilding took 1.4 s inside the first answer after any change).
Scoring is bm25s's default, Lucene BM25 (k1 1.5, b 0.75, idf ``log(1 + (N - df + 0.5) / (df + 0.5))``)
over bm25s's tokens (lower-cased words, English stop words removed), so results are the ones
``bm25s.BM25`` gives for the same passages (``tests/test_prompts_and_retrieval.py`` compares them);
bm25s itself has no incremental index.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import bm25s
import numpy as np

from training.types import Document

K1, B = 1.5, 0.75


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str
    score: float = 0.0


def split_passages(doc: Document, max_words: int = 120, overlap: int = 30, max_chars: int | None = None) -> list[Passage]:
    """Overlapping word windows, so a long article can contribute only its relevant part; a window
    longer than ``max_chars`` (a text without spaces) is cut into pieces of that many characters."""
    words = doc.text.split()
    if len(words) <= max_words:
        windows = [doc.text.strip()]
    else:
        step = max_words - overlap
        windows = [" ".join(words[start : start + max_words]) for start in range(0, max(len(words) - overlap, 1), step)]
    if max_chars is not None:
        windows = [w[i : i + max_chars] for w in windows for i in range(0, max(len(w), 1), max_chars)]
    return [Passage(doc.id, w) for w in windows]


def tokenize(texts: list[str]) -> list[list[str]]:
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def labelled_passages(documents: Iterable[Document], hashes: Iterable[str | None] | None, max_words: int,
                      max_chars: int | None) -> list[tuple[Document, str | None, list[Passage]]]:
    """Each document with its content hash (None without ``hashes``) and its passages: what every
    index's ``add`` takes apart."""
    documents = list(documents)
    hashes = list(hashes) if hashes is not None else [None] * len(documents)
    return [(doc, h, split_passages(doc, max_words, max_chars=max_chars)) for doc, h in zip(documents, hashes)]


class BM25Index:
    """A BM25 index over the passages of documents, safe to search while another thread updates it."""

    def __init__(self, documents: Iterable[Document] = (), max_words: int = 120, max_chars: int | None = None) -> None:
        self.max_words, self.max_chars = max_words, max_chars
        self._lock = threading.RLock()
        self._passages: list[Passage | None] = []  # by slot; None: a free slot
        self._lengths = np.zeros(0, dtype=np.float64)  # tokens per slot (0 when free)
        self._free: list[int] = []
        self._slots: dict[str, list[int]] = {}  # document id -> its passages' slots
        self._hashes: dict[str, str | None] = {}  # document id -> the content it was indexed with
        self._postings: dict[str, dict[int, int]] = {}  # token -> {slot: term frequency}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # postings as arrays, built on demand
        self._total_length = 0
        self._count = 0  # passages in the index
        self.add(documents)

    def __len__(self) -> int:
        """Passages in the index."""
        return self._count

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._slots

    def documents(self) -> dict[str, str | None]:
        """Id -> the content hash each indexed document was added with."""
        with self._lock:
            return dict(self._hashes)

    def add(self, documents: Iterable[Document], hashes: Iterable[str | None] | None = None) -> None:
        """Index documents (replacing any indexed under the same id); ``hashes`` label their content."""
        passages = labelled_passages(documents, hashes, self.max_words, self.max_chars)
        tokens = tokenize([p.text for _, _, ps in passages for p in ps]) if passages else []
        with self._lock:
            self.remove(doc.id for doc, _, _ in passages)
            position = 0
            for doc, content, ps in passages:
                slots = []
                for passage in ps:
                    slots.append(self._put(passage, tokens[position]))
                    position += 1
                self._slots[doc.id] = slots
                self._hashes[doc.id] = content

    def remove(self, doc_ids: Iterable[str]) -> None:
        with self._lock:
            for doc_id in doc_ids:
                for slot in self._slots.pop(doc_id, []):
                    self._drop(slot)
                self._hashes.pop(doc_id, None)

    def _put(self, passage: Passage, tokens: list[str]) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._passages)
            self._passages.append(None)
            if slot >= len(self._lengths):
                self._lengths = np.concatenate([self._lengths, np.zeros(max(64, len(self._lengths)))])
        self._passages[slot] = passage
        self._count += 1
        self._lengths[slot] = len(tokens)
        self._total_length += len(tokens)
        for token, tf in Counter(tokens).items():
            self._postings.setdefault(token, {})[slot] = tf
            self._arrays.pop(token, None)
        return slot

    def _drop(self, slot: int) -> None:
        passage = self._passages[slot]
        for token in set(tokenize([passage.text])[0]):
            postings = self._postings.get(token)
            if postings is not None:
                postings.pop(slot, None)
                if not postings:
                    del self._postings[token]
                self._arrays.pop(token, None)
        self._total_length -= int(self._lengths[slot])
        self._lengths[slot] = 0
        self._passages[slot] = None
        self._count -= 1
        self._free.append(slot)

    def _postings_array(self, token: str) -> tuple[np.ndarray, np.ndarray]:
        if token not in self._arrays:
            postings = self._postings[token]
            self._arrays[token] = (np.fromiter(postings.keys(), dtype=np.int64, count=len(postings)),
                                   np.fromiter(postings.values(), dtype=np.float64, count=len(postings)))
        return self._arrays[token]

    def search(self, query: str, k: int = 3, min_score_ratio: float = 0.0) -> list[Passage]:
        """Top-k passages with a positive score, best first (ties in index order).

        ``min_score_ratio`` drops passages scoring below that fraction of the best one: a small
        model answers better from one clearly relevant passage than from it plus distractors.
        """
        terms = Counter(tokenize([query])[0])
        with self._lock:
            n = self._count
            if k <= 0 or n == 0:
                return []
            average = self._total_length / n
            scores = np.zeros(len(self._lengths))
            for token, count in terms.items():  # a repeated query word counts each time, as in bm25s
                if token not in self._postings:
                    continue
                slots, tf = self._postings_array(token)
                idf = math.log(1 + (n - len(slots) + 0.5) / (len(slots) + 0.5))
                scores[slots] += count * idf * tf / (tf + K1 * (1 - B + B * self._lengths[slots] / average))
            hits = np.flatnonzero(scores > 0)
            best = hits[np.lexsort((hits, -scores[hits]))][:k]
            out = [Passage(self._passages[i].doc_id, self._passages[i].text, float(scores[i])) for i in best]
        return [h for h in out if h.score >= min_score_ratio * out[0].score] if out else out
