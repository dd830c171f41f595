"""Aggregation network: a question and the memory entries become one modulation.

The question's N tokens cross-attend to the memory tokens; the modulation is what they read there
(the first block has no residual from the question). The question thus only decides *where* to
read: the base model already sees the question in its prompt, and a question-to-modulation path
lets training memorise answers from question wording instead of learning to read memory (measured:
with it, the answer NLL with the right document in memory was 1.37 against 1.57 with a wrong one
after 150 steps on 16 paragraphs; without it 1.64 against 3.28, see docs/mac.md). An empty memory
gives a zero modulation, i.e. the prefix projection's constant prefix. Because the blocks are
permutation-invariant over the memory tokens and the output lives in the same space as a memory
entry (``[N, hidden]``), a large memory can be aggregated *hierarchically*: aggregate groups of
entries, then aggregate the group results as entries, so peak memory is bounded by the group
size instead of the bank size. (The official MAC code's hierarchical loop iterates over the
question's tokens, and its evaluation aggregates the whole memory flat; here the loop is over
memory entries and evaluation uses it.) ``select_top_k`` narrows a 10^4-10^5 entry bank to the k
entries whose retrieval keys are closest to the question's key before any aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from training.mac.layers import CrossAttentionBlock


class Aggregator(nn.Module):
    def __init__(self, dim: int, heads: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, heads) for _ in range(layers))

    def forward(self, query: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """``query [B, N, D]``, ``memory [B, M, D]`` (or ``None``) -> modulation ``[B, N, D]``."""
        if memory is None or memory.shape[1] == 0:
            return torch.zeros_like(query)
        x = self.blocks[0](query, memory, residual=False)
        for block in self.blocks[1:]:
            x = block(x, memory)
        return x


def _join(entries: list[torch.Tensor], batch: int) -> torch.Tensor:
    """Concatenate entries along tokens; shared ``[n, D]`` entries are broadcast to the batch."""
    parts = [e.unsqueeze(0).expand(batch, -1, -1) if e.dim() == 2 else e for e in entries]
    return torch.cat(parts, dim=1)


def aggregate(
    aggregator: Aggregator,
    query: torch.Tensor,
    entries: Iterable[torch.Tensor],
    group_size: int | None = None,
) -> torch.Tensor:
    """Aggregate memory entries (each ``[n_i, D]`` shared by the batch, or ``[B, n_i, D]``).

    ``group_size=None`` aggregates flat. Otherwise entries are consumed lazily, ``group_size`` at
    a time, so only one group (plus one ``[B, N, D]`` result per group) is ever held; with at most
    ``group_size`` entries the result is exactly the flat aggregation.
    """
    batch = query.shape[0]
    if group_size is None:
        entries = list(entries)
        return aggregator(query, _join(entries, batch) if entries else None)
    if group_size < 2:
        raise ValueError("group_size must be at least 2 (or None for flat aggregation)")
    level: list[torch.Tensor] = []
    buffer: list[torch.Tensor] = []
    for entry in entries:
        if len(buffer) == group_size:  # flush only once we know more entries follow
            level.append(aggregator(query, _join(buffer, batch)))
            buffer = []
        buffer.append(entry)
    if not level:
        return aggregator(query, _join(buffer, batch) if buffer else None)
    level.append(aggregator(query, _join(buffer, batch)))
    while len(level) > group_size:
        level = [
            aggregator(query, _join(level[i : i + group_size], batch))
            for i in range(0, len(level), group_size)
        ]
    return aggregator(query, _join(level, batch))


def select_top_k(query_key: torch.Tensor, ids: Sequence[str], keys: torch.Tensor, k: int) -> list[str]:
    """Ids of the k entries whose (L2-normalised) keys have the highest cosine with the query key."""
    if k >= len(ids):
        return list(ids)
    scores = keys.float() @ query_key.float().to(keys.device)
    return [ids[i] for i in torch.topk(scores, k).indices.tolist()]


def iter_bank_entries(
    bank, ids: Sequence[str], chunk: int = 64, device: torch.device | str | None = None
) -> Iterator[torch.Tensor]:
    """Stream entries out of a ``MemoryBank`` ``chunk`` ids at a time (bounded peak memory)."""
    for start in range(0, len(ids), chunk):
        for memory in bank.get(list(ids[start : start + chunk])):
            if memory is not None:
                yield memory if device is None else memory.to(device)
