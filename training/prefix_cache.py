"""Key/values of prompt prefixes, kept so that a later prompt starting with the same tokens skips
their prefill (vLLM's automatic prefix caching, SGLang's RadixAttention).

On a CPU, prefill is most of a short answer's cost (SmolLM2-135M, one thread: ~0.55 s for a
230-token retrieval prompt against ~0.07 s per decoding step, and answers of a few tokens), and a news service's prompts
share a lot: every prompt starts with the same system prompt, and questions about the same article
retrieve the same passages, which come before the question (``training.prompts.qa_messages``).

A prefix is reused only within its namespace (the service uses the tenant and the adapter version:
the key/values depend on the adapter's weights, and a tenant must not learn from its latency what
another tenant asked about). Prefixes are cut at multiples of ``block_tokens`` and looked up
longest first; the cache holds whole entries in least-recently-used order within ``max_bytes``.
Reused key/values are the ones the same tokens produced before, so answers match those of a
full prefill up to float rounding (greedy answers were identical in the tests, on tiny models and
SmolLM2, and in every pair of the load run's lone-asker comparison).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import DynamicCache


class PrefixCacheConfig(BaseModel):
    """How much prompt key/value the service keeps for reuse."""

    model_config = ConfigDict(extra="forbid")

    max_mb: float = Field(256.0, ge=0, description="RAM for cached prompt prefixes (0: off)")
    block_tokens: int = Field(1, ge=1, description="prefixes are reused in multiples of this many tokens (1: any "
                                                   "shared prefix, as SGLang's radix cache)")


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [1, heads, tokens, dim]
    nbytes: int
    keys: list[tuple]  # the index keys pointing at this entry


class PrefixCache:
    """Thread-safe; ``lookup`` and ``store`` are called by the one thread that runs the model, the
    counters are read by metrics."""

    def __init__(self, config: PrefixCacheConfig) -> None:
        self.max_bytes = int(config.max_mb * 2**20)
        self.block = config.block_tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._index: dict[tuple, int] = {}  # (namespace, prefix length, prefix hash) -> entry id
        self._next_id = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens whose prefill was skipped
        self.prompt_tokens = 0  # prompt tokens looked up

    def _boundaries(self, namespace: Hashable, ids: list[int]) -> list[tuple]:
        """Index keys of each block-aligned prefix that leaves at least one token to prefill
        (the last token's logits give the first answer token), shortest first."""
        keys, h = [], 0
        for end in range(self.block, len(ids), self.block):
            h = hash((h, tuple(ids[end - self.block:end])))
            keys.append((namespace, end, h))
        return keys

    def _longest(self, namespace: Hashable, ids: list[int]) -> tuple[int, int | None]:
        for key in reversed(self._boundaries(namespace, ids)):
            entry_id = self._index.get(key)
            if entry_id is not None and self._entries[entry_id].tokens[:key[1]] == tuple(ids[:key[1]]):
                return key[1], entry_id  # (the token check: a hash collision never reuses wrong tokens)
        return 0, None

    def cached_length(self, namespace: Hashable, ids: list[int]) -> int:
        """How many of ``ids``' first tokens ``lookup`` would give now (nothing counted or reordered)."""
        with self._lock:
            return self._longest(namespace, ids)[0] if self.max_bytes else 0

    def lookup(self, namespace: Hashable, ids: list[int]) -> tuple[int, DynamicCache | None]:
        """The longest cached prefix of ``ids``: its length and a cache holding its key/values
        (a fresh ``DynamicCache``: extending it never changes the stored tensors), or ``(0, None)``."""
        with self._lock:
            self.prompt_tokens += len(ids)
            length, entry_id = self._longest(namespace, ids) if self.max_bytes else (0, None)
            if entry_id is None:
                return 0, None
            self._entries.move_to_end(entry_id)
            self.hit_tokens += length
            cache = DynamicCache()
            for layer, (k, v) in enumerate(self._entries[entry_id].layers):
                cache.update(k[:, :, :length], v[:, :, :length], layer)
            return length, cache

    def holds(self, namespace: Hashable, ids: list[int]) -> bool:
        """Whether ``store`` would add nothing: ``ids``' longest block-aligned prefix is cached (or
        the cache is off, or ``ids`` is shorter than a block)."""
        keys = self._boundaries(namespace, ids)
        with self._lock:
            return not keys or self.max_bytes == 0 or keys[-1] in self._index

    def store(self, namespace: Hashable, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the key/values of ``ids``' longest block-aligned prefix (``layers``: per layer, keys
        and values ``[1, heads, >= that many tokens, dim]``, copied), then evict least recently used
        entries over budget."""
        keys = self._boundaries(namespace, ids)
        if not keys or self.max_bytes == 0:
            return
        length = keys[-1][1]
        layers = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in layers]
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if keys[-1] in self._index:  # that whole prefix is cached already
                return
            entry_id, self._next_id = self._next_id, self._next_id + 1
            self._entries[entry_id] = _Entry(tuple(ids[:length]), layers, nbytes, keys)
            self.bytes += nbytes
            for key in keys:  # shorter prefixes now point at the newest entry holding them
                self._index[key] = entry_id
            while self.bytes > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        entry_id, entry = self._entries.popitem(last=False)
        self.bytes -= entry.nbytes
        for key in entry.keys:
            if self._index.get(key) == entry_id:
                del self._index[key]

    def __len__(self) -> int:
        return len(self._entries)
