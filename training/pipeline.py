"""The answer pipeline the service runs and the harness measures: which knowledge a question draws
on (a strategy: MAC memory, the live adapter, retrieved passages, or a combination), and the one
generation call that uses it.

``PipelineConfig`` holds the service's answering defaults; the harness's ``pipeline:<strategy>``
methods and ``auto`` (the default strategy) run with the same values, so their figures describe
what the service does.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.generation import generate_answers
from training.mac.runtime import MacRuntime
from training.prompts import qa_messages

COMPONENTS = ("mac", "adapter", "rag")
# What `auto` means: the combination that was best on the validation streams (docs/BENCHMARKS.md,
# "The default configuration"), restricted to the components a deployment has.
DEFAULT_STRATEGY = "mac+rag"


def parse_strategy(strategy: str) -> set[str] | None:
    """``auto`` -> None (the default, decided per deployment); ``none`` -> {}; else the named components."""
    if strategy == "auto":
        return None
    if strategy == "none":
        return set()
    parts = strategy.split("+")
    if not parts or any(p not in COMPONENTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"unknown strategy {strategy!r}: use auto, none, or a '+'-joined set of {COMPONENTS}")
    return set(parts)


def strategy_name(components: set[str]) -> str:
    return "+".join(c for c in COMPONENTS if c in components) or "none"


class PipelineConfig(BaseModel):
    """How questions are answered by default (the service's settings default to these)."""

    model_config = ConfigDict(extra="forbid")

    strategy: str = Field(DEFAULT_STRATEGY, description="what `auto` uses (restricted to the deployed components)")
    rag_top_k: int = Field(3, ge=1, le=20, description="passages in the prompt")
    rag_min_score_ratio: float = Field(0.5, ge=0.0, le=1.0, description="drop passages scoring below this share of the best")
    rag_passage_words: int = Field(120, ge=10, description="words per retrieved passage")

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        if parse_strategy(value) is None:
            raise ValueError("the default strategy must name components, not 'auto'")
        return value


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    passages: list[list[str] | None],
    max_new_tokens: int,
    mac: MacRuntime | None = None,
    adapter_active: bool = False,
    **generate_kwargs,
) -> list[tuple[str, list[str]]]:
    """Short answers (greedy) and the memory entries each read: after the question's MAC entries
    when ``mac`` is given, else plain generation; ``passages`` go in the prompt either way. With an
    adapter active the MAC prompt head is recomputed by ``model`` (the cached one is the writer's)."""
    if mac is not None:
        return mac.answer(model, questions, passages, max_new_tokens, head=None if adapter_active else "cached")
    prompts = [qa_messages(q, p) for q, p in zip(questions, passages)]
    texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=len(prompts), **generate_kwargs)
    return [(text, []) for text in texts]
