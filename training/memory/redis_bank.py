"""Redis implementation of the memory bank (see ``training.memory.base.MemoryBank``): the service's.

Key layout, all under one hash tag so multi-key transactions work on Redis Cluster:

* ``{prefix}:{<bank>}:ids``           set of document ids
* ``{prefix}:{<bank>}:m:<doc_id>``    hash: ``storage`` (``float16`` / ``int8`` / ``int4`` / ``int2``),
  ``shape``, ``memory`` (the payload: fp16, int8, or packed KIVI codes), ``scale`` (int8: fp16, one
  per last-axis vector; KIVI: fp16, one per group), ``zero`` (KIVI: fp16, one per group), ``group``
  (KIVI's group size), ``key`` (fp16)

Each entry says how it is stored, so a bank switched to another storage keeps reading the entries
written before; entries from before the ``storage`` field (issue 16) are fp16, or int8 when they
have a ``scale``.

``<bank>`` names the artifact that produced the modulations, so memory written by one MAC
artifact is never read with another.
"""

from __future__ import annotations

import numpy as np
import redis
import torch

from training.memory.base import PART_DTYPES, EncodedEntry, Storage, check_storage, decode_entry, encode_entry

FIELDS = ["storage", "shape", "group", "memory", "scale", "zero"]
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
    group = int(stored["group"]) if stored["group"] else None
    return decode_entry(EncodedEntry(storage, shape, parts, group))


class RedisMemoryBank:
    def __init__(
        self, client: redis.Redis, bank: str = "default", prefix: str = "freshlm", storage: Storage = "float16"
    ) -> None:
        self.storage = check_storage(storage)
        self.client = client
        self.bank = bank
        self._base = f"{prefix}:{{{bank}}}"
        self._ids_key = f"{self._base}:ids"

    def _entry_key(self, doc_id: str) -> str:
        return f"{self._base}:m:{doc_id}"

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        encoded = encode_entry(memory, self.storage)
        fields = {"storage": encoded.storage, "shape": ",".join(map(str, encoded.shape)),
                  **{name: _to_bytes(part) for name, part in encoded.parts.items()}}
        if encoded.group is not None:
            fields["group"] = str(encoded.group)
        if key is not None:
            fields["key"] = _to_bytes(key.detach().reshape(-1).to(torch.float16))
        entry = self._entry_key(doc_id)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(entry)  # replace, never merge with a stale key field
            pipe.hset(entry, mapping=fields)
            pipe.sadd(self._ids_key, doc_id)
            pipe.execute()

    def get(self, doc_ids: list[str]) -> list[torch.Tensor | None]:
        if not doc_ids:
            return []
        with self.client.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hmget(self._entry_key(doc_id), FIELDS)
            rows = pipe.execute()
        return [_decode_row(row) for row in rows]

    def delete(self, doc_id: str) -> bool:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._entry_key(doc_id))
            pipe.srem(self._ids_key, doc_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def ids(self) -> list[str]:
        return sorted(m.decode() for m in self.client.smembers(self._ids_key))

    def keys(self) -> tuple[list[str], torch.Tensor | None]:
        ids = self.ids()
        with self.client.pipeline(transaction=False) as pipe:
            for doc_id in ids:
                pipe.hget(self._entry_key(doc_id), "key")
            payloads = pipe.execute()
        pairs = [(i, p) for i, p in zip(ids, payloads) if p is not None]
        if not pairs:
            return [], None
        keys = np.stack([np.frombuffer(p, dtype=np.float16) for _, p in pairs])
        return [i for i, _ in pairs], torch.from_numpy(keys.astype(np.float32))

    def __len__(self) -> int:
        return int(self.client.scard(self._ids_key))

    def __contains__(self, doc_id: object) -> bool:
        return bool(self.client.sismember(self._ids_key, str(doc_id)))

    def clear(self) -> None:
        ids = self.ids()
        with self.client.pipeline(transaction=True) as pipe:
            for doc_id in ids:
                pipe.delete(self._entry_key(doc_id))
            pipe.delete(self._ids_key)
            pipe.execute()

    def nbytes(self, doc_id: str) -> int:
        entry = self._entry_key(doc_id)
        return sum(int(self.client.hstrlen(entry, field)) for field in ("memory", "scale", "zero", "key"))
