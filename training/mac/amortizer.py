"""Amortization network: a document becomes a memory entry in one forward pass of the base model.

Each chunk of the document is run through the frozen base model exactly where a RAG prompt would
put it (after the shared prompt head, as ``<documents> [1] ...``), followed by ``memory_tokens``
learned input embeddings: N learned queries that read the document through the base model's own
attention. The entry keeps, per layer and key/value head, the ``doc_slots`` document tokens that
received the most attention from the rest of the chunk (heavy hitters, as in H2O KV-cache
compression) plus the memory tokens' own key/values. Why the base model and not a separate
encoder plus a projection: memory the base model wrote itself is readable from step 0 (the oracle
prompt it compresses scores 56 F1), while a MiniLM writer trained from scratch to emit prefix
key/values learned to drop the document on unseen paragraphs (docs/mac.md, fourth session).
No gradient step happens at ingest; the only trained parameters are the memory tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from training.mac.config import MACConfig
from training.mac.prefix import PromptHead
from training.token_batches import prompt_ids

SEGMENT_QUESTION = "?"
# tokens a passage's "<documents> [1] ... </documents>" framing (and re-tokenising a chunk) may add: 13 for
# SmolLM2, 29 for the tests' byte-level tokenizer (16 before issue 19's delimiters: questions now start
# 16 positions later, see docs/BENCHMARKS.md "Prompt injection")
SEGMENT_OVERHEAD = 32

# which document tokens an entry keeps: "h2o" = heavy hitters (Zhang et al. 2023) (``heavy_hitter_scores``),
# "kvzip" = context reconstruction (``reconstruction_scores``; one more forward pass per chunk)
SlotScores = Literal["h2o", "kvzip"]


@contextmanager
def eager_attention(model: PreTrainedModel) -> Iterator[None]:
    """Attention weights are only returned by the eager implementation; switch for the duration.
    (Eager and SDPA compute the same values, so a concurrent forward pass stays correct.)"""
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)


def chunk_texts(tokenizer: PreTrainedTokenizerBase, text: str, cfg: MACConfig) -> list[str]:
    """The document cut into at most ``max_chunks`` windows of ``chunk_tokens`` base tokens."""
    ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
    windows = [ids[i : i + cfg.chunk_tokens] for i in range(0, len(ids), cfg.chunk_tokens)][: cfg.max_chunks]
    return [tokenizer.decode(w) for w in windows] or [""]


def segment_ids(tokenizer: PreTrainedTokenizerBase, head: PromptHead | None, text: str) -> list[int]:
    """The tokens a RAG prompt puts between the shared head and the question for one passage."""
    skip = len(head) if head is not None else 0
    with_passage = prompt_ids(tokenizer, SEGMENT_QUESTION, [text])
    tail = prompt_ids(tokenizer, SEGMENT_QUESTION)[skip:]
    if with_passage[-len(tail):] != tail:  # the tokenizer merged across the boundary
        raise ValueError("cannot split the passage out of the RAG prompt for this tokenizer")
    return with_passage[skip : len(with_passage) - len(tail)]


def heavy_hitter_scores(attentions: tuple[torch.Tensor, ...], offset: int, length: int, kv_heads: int) -> list[torch.Tensor]:
    """Per layer ``[kv_heads, length]``: the mean attention each of the ``length`` document tokens
    (keys from ``offset`` on) receives from the document's later tokens, summed over a KV head's
    query heads."""
    scores = []
    for att in attentions:  # [1, heads, q, kv]
        received = att[0, :, :, offset : offset + length].float()
        seen_by = torch.arange(received.shape[1], received.shape[1] - length, -1, device=received.device)
        per_head = received.sum(1) / seen_by.clamp(min=1)
        scores.append(per_head.view(kv_heads, -1, length).sum(1))
    return scores


RECONSTRUCTION_PROMPT = "\n\nRepeat the previous context exactly:\n"


def reconstruction_scores(
    base: PreTrainedModel, cache: DynamicCache, prompt: list[int], segment: list[int], offset: int, kv_heads: int,
) -> list[torch.Tensor]:
    """Per layer ``[kv_heads, length]``: KVzip's question-agnostic importance (Kim et al. 2025,
    arXiv 2505.23416). After the document, the model is told to repeat it and re-reads it
    (teacher-forced); a document token's score is the most attention any of those queries, of
    any query head of the KV head, pays it. A token the model needs to reconstruct the document
    is one a question about it is likely to need; H2O's mean attention favours tokens every
    later token glances at (punctuation, the first words). The cache is cropped back after."""
    length, end = len(segment), offset + len(segment)
    queries = prompt + segment
    with torch.no_grad(), eager_attention(base):
        out = base.base_model(input_ids=torch.tensor([queries], device=base.device), past_key_values=cache,
                              use_cache=True, output_attentions=True,
                              position_ids=torch.arange(end, end + len(queries), device=base.device)[None])
    cache.crop(-len(queries))
    return [att[0, :, :, offset:end].float().amax(1).view(kv_heads, -1, length).amax(1) for att in out.attentions]


class Amortizer(nn.Module):
    def __init__(self, config: MACConfig, hidden: int) -> None:
        super().__init__()
        self.config = config
        self.memory_tokens = nn.Parameter(torch.zeros(config.memory_tokens, hidden))

    @torch.no_grad()
    def init_memory_tokens(self, base: PreTrainedModel, seed: int = 0) -> None:
        """Start the memory tokens as embeddings of random vocabulary tokens (prompt-tuning init)."""
        table = base.get_input_embeddings().weight
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, table.shape[0], (self.memory_tokens.shape[0],), generator=generator)
        self.memory_tokens.copy_(table[rows.to(table.device)].float())

    def encode_chunk(self, base: PreTrainedModel, head: PromptHead | None, segment: list[int],
                     doc_slots: int | None = None, reconstruction_prompt: list[int] | None = None) -> torch.Tensor:
        """``[layers, 2, kv_heads, slots, head_dim]`` for one chunk's segment tokens.

        Two passes over one cache: the document without autograd (its slots depend on nothing
        trainable), then the memory tokens after it, so training back-propagates through the
        memory tokens' positions only. With ``reconstruction_prompt`` the document slots are chosen
        by ``reconstruction_scores`` (one more pass) instead of H2O's."""
        start = len(head) if head is not None else 0
        device, length = base.device, len(segment)
        cache = DynamicCache([(k.clone(), v.clone()) for k, v in head.kv], config=base.config) if head else None
        with torch.no_grad(), eager_attention(base):  # the decoder without its LM head: no logits needed
            out = base.base_model(input_ids=torch.tensor([segment], device=device), past_key_values=cache,
                                  use_cache=True, output_attentions=True,
                                  position_ids=torch.arange(start, start + length, device=device)[None])
        cache = out.past_key_values
        kv_heads = cache.layers[0].keys.shape[1]
        scores = (heavy_hitter_scores(out.attentions, start, length, kv_heads) if reconstruction_prompt is None
                  else reconstruction_scores(base, cache, reconstruction_prompt, segment, start, kv_heads))
        n_tokens = self.memory_tokens.shape[0]
        if n_tokens:
            tokens = self.memory_tokens.to(base.get_input_embeddings().weight.dtype).unsqueeze(0)
            base.base_model(inputs_embeds=tokens, past_key_values=cache, use_cache=True,
                            position_ids=torch.arange(start + length, start + length + n_tokens, device=device)[None])
        keep = min(doc_slots or self.config.doc_slots, length)
        slots = []
        for layer, score in zip(cache.layers, scores):
            keys, values = layer.keys[0, :, start:], layer.values[0, :, start:]  # [kv_heads, length + tokens, d]
            chosen = torch.topk(score, keep, dim=-1).indices.sort(-1).values
            chosen = torch.cat([chosen, torch.arange(length, length + n_tokens, device=device).expand(kv_heads, -1)], 1)
            index = chosen.unsqueeze(-1).expand(-1, -1, keys.shape[-1])
            slots.append(torch.stack([keys.gather(1, index), values.gather(1, index)]))
        return torch.stack(slots)

    def forward(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: PromptHead | None, text: str,
        doc_slots: int | None = None, slot_scores: SlotScores = "h2o",
    ) -> torch.Tensor:
        """The memory entry of one document: its chunks' slots side by side (``doc_slots`` document
        slots per chunk, else the config's: fewer slots make smaller entries from the same weights;
        ``slot_scores`` picks them, see ``SlotScores``)."""
        limit = self.config.chunk_tokens + SEGMENT_OVERHEAD  # MAC.start puts questions after this
        prompt = (tokenizer(RECONSTRUCTION_PROMPT, add_special_tokens=False)["input_ids"]
                  if slot_scores == "kvzip" else None)
        chunks = [self.encode_chunk(base, head, segment_ids(tokenizer, head, chunk)[:limit], doc_slots, prompt)
                  for chunk in chunk_texts(tokenizer, text, self.config)]
        return torch.cat(chunks, dim=3)
