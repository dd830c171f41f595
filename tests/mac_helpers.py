"""Tiny random MAC setups for the MAC tests (a BERT-style encoder built from a config)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from training.mac.amortizer import chunk_texts, segment_ids
from training.mac.config import MACConfig
from training.mac.model import MAC
from training.models import tiny_causal_lm, tiny_tokenizer


def tiny_encoder(seed: int = 0):
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config).eval(), tokenizer


TINY_MAC = MACConfig(doc_slots=8, memory_tokens=4, chunk_tokens=48, max_chunks=3, key_tokens=32)


def tiny_mac(kind: str = "llama", config: MACConfig = TINY_MAC, seed: int = 0):
    """A MAC network on a tiny random base model; memory tokens start as embeddings of random
    vocabulary tokens, as in training."""
    base, tokenizer = tiny_causal_lm(kind, seed=seed)
    base.requires_grad_(False)
    encoder, enc_tok = tiny_encoder(seed)
    torch.manual_seed(seed)
    mac = MAC(config, encoder, enc_tok, base.config)
    mac.amortizer.init_memory_tokens(base, seed)
    return mac, base, tokenizer


def expected_slots(config: MACConfig, tokenizer, head, text: str) -> int:
    """Slots of a document's entry: per chunk, min(doc_slots, segment length) + memory tokens."""
    return sum(min(config.doc_slots, len(segment_ids(tokenizer, head, chunk))) + config.memory_tokens
               for chunk in chunk_texts(tokenizer, text, config))
