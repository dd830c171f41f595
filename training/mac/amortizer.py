"""Amortization network: a document becomes N memory tokens in one forward pass.

A sentence encoder (all-MiniLM-L6-v2 by default, frozen or with its top layers training) reads
each 256-token chunk of a document; N learned queries read the encoder states through a small
cross-attention decoder and are projected to the base model's hidden size. Long documents give
one group of N tokens per chunk, so the memory entry of a document is ``[chunks * N, hidden]``.
Questions go through the same network: their N tokens are the aggregator's queries.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.mac.config import MACConfig
from training.mac.layers import CrossAttentionBlock


def chunk_token_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, chunk_tokens: int, max_chunks: int
) -> list[list[int]]:
    """Encoder input ids of a text cut into at most ``max_chunks`` windows (special tokens added
    to each, via the fast tokenizer's overflow mechanism)."""
    chunks = tokenizer(
        text, truncation=True, max_length=chunk_tokens, return_overflowing_tokens=True, stride=0
    )["input_ids"]
    return [list(c) for c in chunks[:max_chunks]] or [[]]


def pad_batch(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask``."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT-style encoder (for partial fine-tuning)."""
    for path in ("encoder.layer", "layers", "transformer.layer"):
        module = encoder
        try:
            for name in path.split("."):
                module = getattr(module, name)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the layer list of {type(encoder).__name__} to fine-tune its top layers")


class Amortizer(nn.Module):
    def __init__(self, encoder: PreTrainedModel, config: MACConfig, out_dim: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        encoder.requires_grad_(False)
        if config.train_encoder_layers > 0:
            encoder_layers(encoder)[-config.train_encoder_layers :].requires_grad_(True)
        enc_dim = encoder.config.hidden_size
        self.queries = nn.Parameter(torch.randn(config.n_tokens, config.width) * 0.02)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(config.width, config.heads, kv_dim=enc_dim)
            for _ in range(config.decoder_layers)
        )
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, out_dim)

    @property
    def device(self) -> torch.device:
        return self.queries.device

    def train(self, mode: bool = True) -> "Amortizer":
        """A frozen encoder stays in eval mode (no dropout noise in the memory it produces)."""
        super().train(mode)
        self.encoder.train(mode and self.config.train_encoder_layers > 0)
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Encoder states; no autograd graph at all when the encoder is frozen (saves memory)."""
        train_encoder = self.config.train_encoder_layers > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_encoder):
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory tokens ``[B, N, out_dim]`` and L2-normalised mean-pooled keys ``[B, enc_dim]``."""
        states = self.encode(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        key = nn.functional.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1)
        x = self.queries.unsqueeze(0).expand(states.shape[0], -1, -1)
        padding = attention_mask == 0
        for block in self.blocks:
            x = block(x, states, padding)
        return self.out(self.norm(x)), key.detach()

    def memorize(
        self, tokenizer: PreTrainedTokenizerBase, texts: list[str]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One ``(memory [chunks * N, out_dim], key [enc_dim])`` entry per text, in one batch."""
        cfg = self.config
        chunks = [chunk_token_ids(tokenizer, t, cfg.chunk_tokens, cfg.max_chunks) for t in texts]
        flat = [c for doc in chunks for c in doc]
        ids, mask = pad_batch(flat, tokenizer.pad_token_id or 0, self.device)
        tokens, keys = self(ids, mask)
        entries, start = [], 0
        for doc in chunks:
            end = start + len(doc)
            key = nn.functional.normalize(keys[start:end].mean(0), dim=-1)
            entries.append((tokens[start:end].reshape(-1, tokens.shape[-1]), key))
            start = end
        return entries

    def encode_questions(
        self, tokenizer: PreTrainedTokenizerBase, questions: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Question tokens ``[B, N, out_dim]`` (the aggregator's queries) and keys ``[B, enc_dim]``."""
        cfg = self.config
        ids = [chunk_token_ids(tokenizer, q, cfg.question_tokens, 1)[0] for q in questions]
        input_ids, mask = pad_batch(ids, tokenizer.pad_token_id or 0, self.device)
        return self(input_ids, mask)
