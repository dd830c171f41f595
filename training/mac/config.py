"""Architecture settings of a MAC network (saved in the artifact manifest, so loading rebuilds it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MACConfig(BaseModel):
    """Sizes of the amortization, aggregation and prefix networks.

    Defaults are sized for a CPU budget: a frozen MiniLM encoder, 12 memory tokens per 256-token
    document chunk (12 x 576 fp16 = 13.5 KiB per SmolLM2 entry) and a 12-token prefix.
    """

    n_tokens: int = Field(12, description="memory tokens per document chunk = prefix length")
    width: int = Field(384, description="width of the amortizer decoder (the encoder's hidden size)")
    heads: int = Field(6, description="attention heads of the amortizer decoder and the aggregator")
    decoder_layers: int = Field(2, description="cross-attention blocks turning encoder states into memory")
    aggregator_layers: int = Field(2, description="cross-attention blocks of the aggregation network")
    prefix_bottleneck: int = Field(512, description="hidden size of the P-tuning v2 reparameterisation MLP")
    train_encoder_layers: int = Field(0, description="top encoder layers that train (0 = frozen encoder)")
    chunk_tokens: int = Field(256, description="encoder tokens per document chunk")
    max_chunks: int = Field(4, description="chunks kept per document (long news articles)")
    question_tokens: int = Field(64, description="encoder tokens kept from a question")
