"""Redis implementation of the memory bank (see ``training.memory_bank.MemoryBank``).

Key layout, all under one hash tag so multi-key transactions work on Redis Cluster:

* ``{prefix}:{<bank>}:ids``           set of document ids
* ``{prefix}:{<bank>}:m:<doc_id>``    hash: ``memory`` (fp16 bytes), ``shape``, ``key`` (fp16 bytes)

``<bank>`` names the artifact that produced the modulations, so memory written by one MAC
artifact is never read with another.
"""

from __future__ import annotations

import numpy as np
import redis
import torch


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


def _from_bytes(payload: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(payload, dtype=np.float16).reshape(shape).copy()).float()


class RedisMemoryBank:
    def __init__(self, client: redis.Redis, bank: str = "default", prefix: str = "freshlm") -> None:
        self.client = client
        self.bank = bank
        self._base = f"{prefix}:{{{bank}}}"
        self._ids_key = f"{self._base}:ids"

    def _entry_key(self, doc_id: str) -> str:
        return f"{self._base}:m:{doc_id}"

    def put(self, doc_id: str, memory: torch.Tensor, key: torch.Tensor | None = None) -> None:
        fields = {"memory": _to_bytes(memory), "shape": ",".join(map(str, memory.shape))}
        if key is not None:
            fields["key"] = _to_bytes(key.reshape(-1))
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
                pipe.hmget(self._entry_key(doc_id), ["memory", "shape"])
            rows = pipe.execute()
        out: list[torch.Tensor | None] = []
        for payload, shape in rows:
            if payload is None:
                out.append(None)
            else:
                out.append(_from_bytes(payload, tuple(int(s) for s in shape.decode().split(","))))
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
        return int(self.client.hstrlen(entry, "memory")) + int(self.client.hstrlen(entry, "key"))
