"""Redis implementation of the memory bank (see ``training.memory.base.MemoryBank``): the service's.

Key layout, all under one hash tag so multi-key transactions work on Redis Cluster:

* ``{prefix}:{<bank>}:ids``           set of document ids
* ``{prefix}:{<bank>}:m:<doc_id>``    hash: ``storage`` (``float16`` / ``int8`` / a KIVI storage, whose
  name fixes its bits and groups: ``base.KIVI_SPECS``), ``shape``, ``memory`` (the payload: fp16,
  int8, or packed KIVI codes), ``scale`` (int8: fp16, one per last-axis vector; KIVI: fp16, one per
  group), ``zero`` (KIVI: fp16, one per group), ``key`` (fp16); entries written before 2026-12-03
  also hold ``group`` (always 32, what ``int4`` / ``int2`` still use), which reading ignores

* ``{prefix}:{<bank>}:keys``         hash: document id -> its retrieval key (fp16); the entry hash keeps a copy
* ``{prefix}:{<bank>}:log``          stream of changes (``op`` put / del / clear, ``id``), capped at ~100,000
* ``{prefix}:{<bank>}:missing``      set of ids a question chose but whose entry was gone (evicted / expired)

**Scale.** ``search`` answers a question's top-k from an in-process ``KeyIndex`` (sign-bit codes,
its nearest candidates rescored with their keys read in one ``HMGET``) kept current by reading the
change log since the last question (one ``XINFO`` + one ``XRANGE``), instead of reading every key
from Redis per question; a process that fell behind a trimmed log reloads the keys hash.
With ``ttl_seconds`` every entry hash gets a TTL (refreshed when it is read), which makes entries
*volatile*: under ``maxmemory-policy volatile-lru`` Redis evicts the least recently read entries
when full, never the ids, keys, log or missing set (they have no TTL). An evicted entry stays in
the key index; when a question chooses it, ``get`` returns ``None``, the id goes to ``missing``,
the question falls back to the document's text (``MacRuntime.fallback``) and the worker rewrites
the entry from SQL (``service/worker/reconciler.py``).

Each entry says how it is stored, so a bank switched to another storage keeps reading the entries
written before; entries from before the ``storage`` field (issue 16) are fp16, or int8 when they
have a ``scale``.

``<bank>`` names the artifact that produced the modulations, so memory written by one MAC
artifact is never read with another.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import redis
import torch

from training.memory.base import PART_DTYPES, EncodedEntry, Storage, check_storage, decode_entry, encode_entry

from training.memory.key_index import KeyIndex

FIELDS = ["storage", "shape", "memory", "scale", "zero"]
LOG_MAX = 100_000  # changes kept in the log (approximately); a reader further behind reloads the keys
NUMPY = {torch.float16: np.float16, torch.int8: np.int8, torch.uint8: np.uint8}


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _from_bytes(payload: bytes, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(payload, dtype=NUMPY[dtype]).copy())


def _decode_row(row: list[bytes | None]) -> torch.Tensor | None:
    stored = dict(zip(FIELDS, row))
    if stored["memory"] is None:
        return None
    storage = stored["storage"].decode() if stored["storage"] else ("int8" if stored["scale"] else "float16")
    shape = tuple(int(s) for s in stored["shape"].decode().split(","))
    parts = {name: _from_bytes(stored[name], dtype) for name, dtype in PART_DTYPES[storage].items()}
    return decode_entry(EncodedEntry(storage, shape, parts))


def _stream_id(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class RedisMemoryBank:
    def __init__(
        self, client: redis.Redis, bank: str = "default", prefix: str = "freshlm", storage: Storage = "float16",
        ttl_seconds: int | None = None, index: KeyIndex | None = None,
    ) -> None:
        self.storage = check_storage(storage)
        self.client = client
        self.bank = bank
        self.ttl_seconds = ttl_seconds
        self._base = f"{prefix}:{{{bank}}}"
        self._ids_key = f"{self._base}:ids"
        self._keys_key = f"{self._base}:keys"
        self._log_key = f"{self._base}:log"
        self._missing_key = f"{self._base}:missing"
        # in-process key index (pass one shared per bank name so views of a bank share it)
        self.index = index if index is not None else KeyIndex()
        self._seen: tuple[int, int] | None = None  # last log entry applied to the index
        self._sync_lock = threading.Lock()

    def _entry_key(self, doc_id: str) -> str:
        return f"{self._base}:m:{doc_id}"

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        encoded = encode_entry(memory, self.storage)
        fields = {"storage": encoded.storage, "shape": ",".join(map(str, encoded.shape)),
                  **{name: _to_bytes(part) for name, part in encoded.parts.items()}}
        if key is not None:
            fields["key"] = _to_bytes(key.detach().reshape(-1).to(torch.float16))
        entry = self._entry_key(doc_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(entry)  # replace, never merge with a stale key field
            pipe.hset(entry, mapping=fields)
            if self.ttl_seconds:
                pipe.expire(entry, self.ttl_seconds)
            pipe.sadd(self._ids_key, doc_id)
            if key is not None:
                pipe.hset(self._keys_key, doc_id, fields["key"])
            else:
                pipe.hdel(self._keys_key, doc_id)
            pipe.srem(self._missing_key, doc_id)
            pipe.xadd(self._log_key, {"op": "put", "id": doc_id}, maxlen=LOG_MAX, approximate=True)
            pipe.execute()

    def get(self, doc_ids: list[str]) -> list[torch.Tensor | None]:
        if not doc_ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hmget(self._entry_key(doc_id), FIELDS)
                if self.ttl_seconds:  # a read keeps the entry alive (and recent for LRU)
                    pipe.expire(self._entry_key(doc_id), self.ttl_seconds)
            rows = pipe.execute()
        if self.ttl_seconds:
            rows = rows[::2]
        return [_decode_row(row) for row in rows]

    def mark_missing(self, doc_ids: list[str]) -> None:
        """Ids a question chose whose entry was gone: the worker rewrites them from SQL."""
        if doc_ids:
            self.client.sadd(self._missing_key, *doc_ids)

    def missing(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(self._missing_key))

    def search(self, query_key: torch.Tensor, k: int) -> list[str]:
        """Ids of the k entries whose keys are closest to ``query_key`` (cosine), best first."""
        self.sync_index()
        return self.index.search(query_key.detach().cpu().float().numpy(), k, self.exact_keys)

    def exact_keys(self, doc_ids: list[str]) -> list[np.ndarray | None]:
        """The stored (fp16) keys of ``doc_ids``: the index rescores its candidates with them."""
        return [np.frombuffer(p, np.float16) if p is not None else None
                for p in self.client.hmget(self._keys_key, doc_ids)]

    def sync_index(self) -> None:
        """Apply the log since the last call to the in-process key index (reload all keys if the
        log was trimmed past it, or on the first call)."""
        with self._sync_lock:
            try:
                info = self.client.xinfo_stream(self._log_key)
                first = info.get("first-entry")
                first_id = _stream_id(first[0]) if first else None
                last_id = _stream_id(info["last-generated-id"])
            except redis.ResponseError:  # no log yet (an empty bank, or one written before the log)
                first_id, last_id = None, (0, 0)
            # first call, changes since the last one applied were trimmed from the log, or the log is
            # older than what was applied (Redis restarted empty): reload
            if (self._seen is None or last_id < self._seen
                    or (last_id > self._seen and (first_id is None or first_id > self._seen))):
                self.index.clear()
                for ids, keys in self._key_chunks():  # a block at a time: no copy of every key at once
                    self.index.add(ids, keys)
                self._seen = last_id
                return
            entries = self.client.xrange(self._log_key, min=f"({self._seen[0]}-{self._seen[1]}", max="+")
            if not entries:
                return
            puts: list[str] = []
            for entry_id, change in entries:
                op, doc_id = change[b"op"], change.get(b"id", b"").decode()
                if op == b"clear":
                    self.index.clear()
                    puts = []
                elif op == b"del":
                    self.index.remove([doc_id])
                    puts = [p for p in puts if p != doc_id]
                else:
                    puts.append(doc_id)
            if puts:
                payloads = self.client.hmget(self._keys_key, puts)
                found = [(i, p) for i, p in zip(puts, payloads) if p is not None]
                self.index.remove([i for i, p in zip(puts, payloads) if p is None])
                if found:
                    self.index.add([i for i, _ in found], np.stack([np.frombuffer(p, np.float16) for _, p in found]))
            self._seen = _stream_id(entries[-1][0])

    def delete(self, doc_id: str) -> bool:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._entry_key(doc_id))
            pipe.srem(self._ids_key, doc_id)
            pipe.hdel(self._keys_key, doc_id)
            pipe.srem(self._missing_key, doc_id)
            pipe.xadd(self._log_key, {"op": "del", "id": doc_id}, maxlen=LOG_MAX, approximate=True)
            deleted, listed, *_ = pipe.execute()
        return bool(deleted or listed)

    def ids(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(self._ids_key))

    def keys(self) -> tuple[list[str], torch.Tensor | None]:
        """Every id with a key (float32, as stored)."""
        chunks = list(self._key_chunks())
        if not chunks:
            return [], None
        return [i for ids, _ in chunks for i in ids], torch.from_numpy(np.concatenate([k for _, k in chunks]))

    def _key_chunks(self, size: int = 5000) -> Iterator[tuple[list[str], np.ndarray]]:
        """Ids with their keys ``[n, dim]`` (float32), ``size`` ids at a time, from the keys hash; an
        entry written before it (no copy there) is read from its own hash and copied into it."""
        all_ids = self.ids()
        for start in range(0, len(all_ids), size):
            ids = all_ids[start : start + size]
            payloads = self.client.hmget(self._keys_key, ids)
            legacy = [i for i, p in zip(ids, payloads) if p is None]
            if legacy:
                with self.client.pipeline(transaction=False) as pipe:
                    for doc_id in legacy:
                        pipe.hget(self._entry_key(doc_id), "key")
                    found = dict(zip(legacy, pipe.execute()))
                copies = {i: p for i, p in found.items() if p is not None}
                if copies:
                    self.client.hset(self._keys_key, mapping=copies)
                payloads = [p if p is not None else found.get(i) for i, p in zip(ids, payloads)]
            pairs = [(i, p) for i, p in zip(ids, payloads) if p is not None]
            if pairs:
                keys = np.stack([np.frombuffer(p, dtype=np.float16) for _, p in pairs]).astype(np.float32)
                yield [i for i, _ in pairs], keys

    def __len__(self) -> int:
        return int(self.client.scard(self._ids_key))

    def __contains__(self, doc_id: object) -> bool:
        return bool(self.client.sismember(self._ids_key, str(doc_id)))

    def clear(self) -> None:
        ids = self.ids()
        with self.client.pipeline(transaction=True) as pipe:
            for doc_id in ids:
                pipe.delete(self._entry_key(doc_id))
            pipe.delete(self._ids_key, self._keys_key, self._missing_key)
            pipe.xadd(self._log_key, {"op": "clear"}, maxlen=LOG_MAX, approximate=True)
            pipe.execute()

    def nbytes(self, doc_id: str) -> int:
        entry = self._entry_key(doc_id)
        return sum(int(self.client.hstrlen(entry, field)) for field in ("memory", "scale", "zero", "key"))
