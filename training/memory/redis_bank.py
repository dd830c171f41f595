"""Redis implementation of the memory bank (see ``training.memory.base.MemoryBank``): the service's.

Key layout, all under one hash tag so multi-key transactions work on Redis Cluster:

* ``{prefix}:{<bank>}:ids``           set of document ids
* ``{prefix}:{<bank>}:m:<doc_id>``    hash: ``memory`` (fp16 bytes, or int8 bytes with ``scale``: fp16
  bytes, one per last-axis vector), ``shape``, ``key`` (fp16 bytes)

Each entry says how it is stored (``scale`` present or not), so a bank switched to ``int8`` storage
keeps reading the fp16 entries written before.

``<bank>`` names the artifact that produced the modulations, so memory written by one MAC
artifact is never read with another.
"""

from __future__ import annotations

import numpy as np
import redis
import torch

from training.memory.base import Storage, check_storage, decode_entry, encode_entry


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().numpy().tobytes()


def _from_bytes(payload: bytes, dtype: type, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(payload, dtype=dtype).reshape(shape).copy())


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
        values, scale = encode_entry(memory, self.storage)
        fields = {"memory": _to_bytes(values), "shape": ",".join(map(str, memory.shape))}
        if scale is not None:
            fields["scale"] = _to_bytes(scale)
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
                pipe.hmget(self._entry_key(doc_id), ["memory", "shape", "scale"])
            rows = pipe.execute()
        out: list[torch.Tensor | None] = []
        for payload, shape, scale in rows:
            if payload is None:
                out.append(None)
                continue
            shape = tuple(int(s) for s in shape.decode().split(","))
            if scale is None:
                out.append(decode_entry(_from_bytes(payload, np.float16, shape), None))
            else:
                out.append(decode_entry(_from_bytes(payload, np.int8, shape),
                                        _from_bytes(scale, np.float16, (*shape[:-1], 1))))
        return out

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
        return sum(int(self.client.hstrlen(entry, field)) for field in ("memory", "scale", "key"))
