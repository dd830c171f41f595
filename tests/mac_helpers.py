"""Tiny random MAC setups for the MAC tests (a BERT-style encoder built from a config)."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

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


TINY_MAC = MACConfig(
    n_tokens=4, width=32, heads=4, decoder_layers=1, aggregator_layers=1, prefix_bottleneck=32,
    chunk_tokens=48, max_chunks=3, question_tokens=32,
)


def tiny_mac(kind: str = "llama", config: MACConfig = TINY_MAC, seed: int = 0):
    base, tokenizer = tiny_causal_lm(kind, seed=seed)
    base.requires_grad_(False)
    encoder, enc_tok = tiny_encoder(seed)
    torch.manual_seed(seed)
    return MAC(config, encoder, enc_tok, base.config), base, tokenizer
