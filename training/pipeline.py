"""The answer pipeline the service runs and the harness measures: which knowledge a question draws
on (a strategy: MAC memory, the live adapter, retrieved passages, or a combination), and the one
generation call that uses it.

``PipelineConfig`` holds the service's answering defaults; the harness's ``pipeline:<strategy>``
methods and ``auto`` (the default strategy) run with the same values, so their figures describe
what the service does.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.generation import StepHook, chat_input_ids, decode_prompts
from training.mac.runtime import MacRuntime
from training.prefix_cache import PrefixCache
from training.prompts import qa_messages
from training.retrievers import RetrieverKind

COMPONENTS = ("mac", "adapter", "rag")
# What `auto` means: the combination with the best mean F1 over the validation streams (squad-seq val,
# RealTimeQA 2023; docs/BENCHMARKS.md, "The default configuration"), restricted to the components a
# deployment has. Measured: retrieval alone, ahead of MAC memory + retrieval and MAC memory alone.
DEFAULT_STRATEGY = "rag"


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
    retriever: RetrieverKind = Field("bm25", description="how passages are found: bm25, dense (MiniLM) or hybrid "
                                                         "(both, reciprocal-rank fusion)")
    rag_top_k: int = Field(3, ge=1, le=20, description="passages in the prompt")
    rag_min_score_ratio: float = Field(0.5, ge=0.0, le=1.0, description="drop passages scoring below this share of the "
                                                                     "best (BM25 score, cosine or fused score)")
    rag_passage_words: int = Field(120, ge=10, description="words per retrieved passage")
    rag_passage_chars: int = Field(2000, ge=100, description="characters per retrieved passage (a text without spaces is cut)")
    max_prompt_tokens: int = Field(1024, ge=64, description="prompt tokens at most (passages are cut to fit), "
                                                            "within the model's context less the answer")

    @field_validator("strategy")
    @classmethod
    def _known(cls, value: str) -> str:
        if parse_strategy(value) is None:
            raise ValueError("the default strategy must name components, not 'auto'")
        return value


class PromptTooLong(ValueError):
    """The question alone does not fit the prompt budget."""


def prompt_budget(model: PreTrainedModel, max_new_tokens: int, max_prompt_tokens: int,
                  mac: MacRuntime | None = None) -> int:
    """Prompt tokens a question may use: ``max_prompt_tokens``, within the model's context less the
    answer's tokens and the positions MAC memory takes before the question."""
    context = getattr(model.config, "max_position_embeddings", None) or max_prompt_tokens + max_new_tokens
    taken = mac.question_start() if mac is not None else 0
    return min(max_prompt_tokens, context - taken - max_new_tokens)


def prompt_length(tokenizer: PreTrainedTokenizerBase, question: str, passages: list[str] | None) -> int:
    return len(chat_input_ids(tokenizer, qa_messages(question, passages))[0])


def fit_passages(tokenizer: PreTrainedTokenizerBase, question: str, passages: list[str] | None,
                 budget: int) -> list[str] | None:
    """The passages (best first) that fit ``budget`` prompt tokens with the question: whole ones
    while they fit, then the next cut to the tokens left. ``PromptTooLong`` if the question alone
    does not fit."""
    if passages and prompt_length(tokenizer, question, passages) <= budget:
        return passages  # all fit (the usual case): one measurement, not one per passage
    if prompt_length(tokenizer, question, None) > budget:
        raise PromptTooLong(f"the question does not fit the prompt budget of {budget} tokens")
    kept: list[str] = []
    for passage in passages or []:
        over = prompt_length(tokenizer, question, kept + [passage]) - budget
        if over <= 0:
            kept.append(passage)
            continue
        ids, cut = tokenizer(passage, add_special_tokens=False)["input_ids"], ""
        while over > 0 and ids:  # decoding a cut can re-tokenize the seam: measure again
            ids = ids[: max(len(ids) - over, 0)]
            cut = tokenizer.decode(ids).strip()
            over = prompt_length(tokenizer, question, kept + [cut]) - budget if cut else 0
        if cut:
            kept.append(cut)
        break
    return kept or None


def plain_prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, passages: list[str] | None,
                     budget: int) -> torch.Tensor:
    """The token ids a question without MAC memory is asked with: its passages cut to ``budget``
    prompt tokens (``PromptTooLong`` if the question alone does not fit), under the chat template."""
    return chat_input_ids(tokenizer, qa_messages(question, fit_passages(tokenizer, question, passages, budget)))[0]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    passages: list[list[str] | None],
    max_new_tokens: int,
    mac: MacRuntime | None = None,
    adapter_active: bool = False,
    max_prompt_tokens: int = PipelineConfig.model_fields["max_prompt_tokens"].default,
    deadline: float | None = None,
    on_step: StepHook | None = None,
    prefix_cache: PrefixCache | None = None,
    **generate_kwargs,
) -> list[tuple[str, list[str], list[str]]]:
    """Short answers (greedy), the memory entries each read and those answered from their text
    (entries that were gone): after the question's MAC entries when ``mac`` is given, else plain
    generation through a ``DecodeBatch``, the service scheduler's decoder (``prefix_cache``: see
    ``training.prefix_cache``); ``passages`` go in the prompt either way, cut to the prompt budget.
    With an adapter active the MAC prompt head is recomputed by ``model`` (the cached one is the
    writer's). ``deadline`` (``time.monotonic()``) ends decoding there with ``GenerationTimeout``;
    ``on_step`` sees each step (``StepHook``). ``generate_kwargs``: PEFT's per-row ``adapter_names``."""
    budget = prompt_budget(model, max_new_tokens, max_prompt_tokens, mac)
    if mac is not None:
        passages = [fit_passages(tokenizer, q, p, budget) for q, p in zip(questions, passages)]
        return mac.answer_with_fallback(model, questions, passages, max_new_tokens,
                                        head=None if adapter_active else "cached", deadline=deadline, on_step=on_step)
    prompts = [plain_prompt_ids(tokenizer, q, p, budget) for q, p in zip(questions, passages)]
    texts = decode_prompts(model, tokenizer, prompts, max_new_tokens, deadline=deadline, on_step=on_step,
                           prefix_cache=prefix_cache, **generate_kwargs)
    return [(text, [], []) for text in texts]
