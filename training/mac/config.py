"""Architecture settings of a MAC network (saved in the artifact manifest, so loading rebuilds it)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class MACConfig(BaseModel):
    """Sizes of a memory entry. Defaults are sized for SmolLM2-135M on a CPU budget: per 256-token
    chunk, 48 of the document's own key/value slots plus 8 learned memory tokens, i.e. 56 slots x
    30 layers x 2 x 3 KV heads x 64 x 2 bytes = 1.3 MB per fp16 entry (docs/mac.md)."""

    doc_slots: int = Field(48, description="document key/value slots kept per chunk (per layer and KV head)")
    memory_tokens: int = Field(8, description="learned memory tokens appended to each chunk (their slots are kept)")
    chunk_tokens: int = Field(256, description="base-model tokens per document chunk")
    max_chunks: int = Field(4, description="chunks kept per document (long news articles)")
    key_tokens: int = Field(256, description="encoder tokens read for a retrieval key")
