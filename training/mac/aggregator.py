"""Aggregation: the memory entries a question reads become one memory in front of its prompt.

The aggregation network is the base model's own attention: the question's tokens attend over the
slots of every entry it reads, at every layer (queries from the question, keys/values = memory).
What bounds the cost is which entries a question reads: ``select_top_k`` keeps the k entries
whose retrieval keys are closest to the question's (a 10^4-10^5 entry bank is narrowed before any
entry is loaded), and ``iter_bank_entries`` streams the chosen entries out of the bank a chunk at
a time. Entries of different lengths (documents with more chunks) are padded and masked.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from training.mac.prefix import PrefixKV


def stack_memories(
    per_question: list[list[torch.Tensor]], device: torch.device | str
) -> tuple[PrefixKV | None, torch.Tensor | None]:
    """Per-layer keys/values ``[B, kv_heads, P, head_dim]`` of each question's entries side by side
    (entries are ``[layers, 2, kv_heads, n, head_dim]``), right-padded to the longest, with the
    slot mask ``[B, P]``; ``(None, None)`` when no question reads any memory."""
    joined = [torch.cat(entries, dim=3) if entries else None for entries in per_question]
    width = max((j.shape[3] for j in joined if j is not None), default=0)
    if width == 0:
        return None, None
    like = next(j for j in joined if j is not None)
    batch = torch.zeros(len(joined), *like.shape[:3], width, like.shape[4], dtype=like.dtype, device=device)
    mask = torch.zeros(len(joined), width, dtype=torch.long, device=device)
    for row, memory in enumerate(joined):
        if memory is not None:
            batch[row, ..., : memory.shape[3], :] = memory.to(device)
            mask[row, : memory.shape[3]] = 1
    return [(batch[:, layer, 0], batch[:, layer, 1]) for layer in range(batch.shape[1])], mask


def select_top_k(query_key: torch.Tensor, ids: Sequence[str], keys: torch.Tensor, k: int) -> list[str]:
    """Ids of the k entries whose (L2-normalised) keys have the highest cosine with the query key."""
    scores = keys.float() @ query_key.float().to(keys.device)
    return [ids[i] for i in torch.topk(scores, min(k, len(ids))).indices.tolist()]


def entry_ids(bank, query_key: torch.Tensor, top_k: int | None, bank_keys=None) -> list[str]:
    """The ids of the entries a question reads from a ``MemoryBank``, best first: its top-k by key
    similarity (from the bank's in-process key index when it has one, ``bank.search``), or every
    entry without ``top_k`` (or without keys). ``bank_keys`` = ``bank.keys()`` when the caller
    already holds them (one read for a batch of questions)."""
    if top_k and bank_keys is None and hasattr(bank, "search"):
        return bank.search(query_key, top_k)
    if top_k:
        ids, keys = bank_keys if bank_keys is not None else bank.keys()
        if keys is not None:
            return select_top_k(query_key.cpu(), ids, keys, top_k)
    return bank.ids()


def entry_scores(bank, query_key: torch.Tensor, ids: Sequence[str]) -> list[float]:
    """Cosine of ``query_key`` with each of ``ids``' keys (L2-normalised; 0 for an id without a
    key), from the bank's stored keys of those ids alone."""
    keys = bank.exact_keys(list(ids))
    query = query_key.detach().float().cpu()
    return [float(torch.tensor(k, dtype=torch.float32) @ query) if k is not None else 0.0 for k in keys]


def batch_keys(bank, top_k: int | None):
    """What ``entry_ids`` needs for a batch of questions: ``None`` when the bank has an in-process
    key index (each question asks it), else every key read once for the batch."""
    return bank.keys() if top_k and not hasattr(bank, "search") else None


def read_entries(bank, ids: Sequence[str], chunk: int = 64) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Entries of ``ids`` read ``chunk`` at a time: ``(entries, ids read, ids whose entry is gone)``."""
    entries, present, missing = [], [], []
    for start in range(0, len(ids), chunk):
        part = list(ids[start : start + chunk])
        for doc_id, memory in zip(part, bank.get(part)):
            if memory is None:
                missing.append(doc_id)
            else:
                entries.append(memory)
                present.append(doc_id)
    return entries, present, missing


def iter_bank_entries(
    bank, ids: Sequence[str], chunk: int = 64, device: torch.device | str | None = None
) -> Iterator[torch.Tensor]:
    """Stream entries out of a ``MemoryBank`` ``chunk`` ids at a time (bounded peak memory)."""
    for start in range(0, len(ids), chunk):
        for memory in bank.get(list(ids[start : start + chunk])):
            if memory is not None:
                yield memory if device is None else memory.to(device)
