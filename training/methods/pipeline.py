"""The service's answer pipeline as harness methods: ``pipeline:<strategy>`` (e.g. ``pipeline:mac+rag``)
and ``auto`` (the service's default strategy, ``PipelineConfig.strategy``).

Ingest does what the service's worker does for each component (a MAC entry into the bank, an
update of the adapter through ``training.updates``, the text for retrieval: ``PipelineConfig.retriever``); answering calls
``training.pipeline.generate``, the function the service's answerer calls (with a prefix cache of
the service's default size, emptied when the adapter changes), with the same passages
(``PipelineConfig``: top k, score ratio, passage words and characters, prompt budget). The updater
is ``MethodConfig.updater`` (the service's ``FRESHLM_UPDATER``) with the ``ft_*`` settings.
"""

from __future__ import annotations

from training.choice_scoring import choice_logprobs
from training.mac.method import harness_runtime
from training.methods.online_ft import update_config
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.pipeline import generate, parse_strategy, strategy_name
from training.prefix_cache import PrefixCache, PrefixCacheConfig
from training.prompts import qa_messages
from training.retrievers import load_embedder, make_retriever
from training.types import Document, Question
from training.updaters import load_updater
from training.updates import LoraUpdater


class PipelineMethod:
    def __init__(self, ctx: MethodContext, strategy: str) -> None:
        self.ctx = ctx
        components = parse_strategy(strategy)
        self.components = parse_strategy(ctx.config.pipeline.strategy) if components is None else components
        self.name = strategy_name(self.components)
        self.mac = harness_runtime(ctx) if "mac" in self.components else None
        self.updater: LoraUpdater | None = None
        if "adapter" in self.components:
            spec = load_updater(ctx.config.updater, ctx.model, ctx.tokenizer, update_config(ctx.config),
                                lr=ctx.config.meta_ft_lr)
            self.updater = LoraUpdater(ctx.model, ctx.tokenizer, spec.token_weights, spec.config, initial=spec.initial)
        self.documents: dict[str, Document] = {}
        cfg = ctx.config.pipeline
        embed = load_embedder(ctx.config.encoder) if cfg.retriever != "bm25" and "rag" in self.components else None
        self._index = make_retriever(cfg.retriever, embed, max_words=cfg.rag_passage_words,
                                     max_chars=cfg.rag_passage_chars)
        self.prefix_cache = PrefixCache(PrefixCacheConfig())  # the service's default, as its scheduler

    @property
    def model(self):
        return self.updater.model if self.updater is not None else self.ctx.model

    def ingest(self, document: Document) -> None:
        if self.mac is not None:
            self.mac.memorize([document.id], [document.text])
        if self.updater is not None:
            self.updater.step(document.text)
            self.prefix_cache = PrefixCache(PrefixCacheConfig())  # new weights: cached key/values are stale
        if "rag" in self.components:
            self.documents[document.id] = document
            self._index.add([document])

    def _passages(self, question: str) -> list[str] | None:
        if "rag" not in self.components:
            return None
        cfg = self.ctx.config.pipeline
        hits = self._index.search(question, k=cfg.rag_top_k, min_score_ratio=cfg.rag_min_score_ratio)
        return [h.text for h in hits] or None

    def answer(self, questions: list[Question]) -> list[str]:
        answers: list[str] = []
        size = self.ctx.config.batch_size
        for start in range(0, len(questions), size):
            batch = [q.question for q in questions[start : start + size]]
            answered = generate(self.model, self.ctx.tokenizer, batch, [self._passages(q) for q in batch],
                                self.ctx.config.max_new_tokens, mac=self.mac, adapter_active=self.updater is not None,
                                max_prompt_tokens=self.ctx.config.pipeline.max_prompt_tokens,
                                prefix_cache=self.prefix_cache)
            answers += [text for text, *_ in answered]
        return answers

    def choice_scores(self, question: Question) -> list[float]:
        choices, passages = list(question.choices or ()), self._passages(question.question)
        if self.mac is not None:
            return self.mac.choice_scores(self.model, question.question, choices, passages,
                                          head=None if self.updater is not None else "cached")
        return choice_logprobs(self.model, self.ctx.tokenizer, qa_messages(question.question, passages), choices)

    def stored_bytes(self) -> int:
        texts = sum(len(d.text.encode()) for d in self.documents.values())
        memory = self.mac.stored_bytes() if self.mac is not None else 0
        adapter = self.updater.adapter_bytes() if self.updater is not None else 0
        return texts + memory + adapter

    def report(self) -> dict:
        if self.updater is None:
            return {}
        return {"steps": self.updater.steps, "skipped_documents": self.updater.skipped,
                "rejected_updates": self.updater.rejected}

    def close(self) -> None:
        if self.updater is not None:
            self.updater.unload()
        if self.mac is not None:
            self.mac.bank.clear()
        self._index.remove(list(self.documents))
        self.documents.clear()


@register_method("pipeline", family=True)
def build_pipeline(ctx: MethodContext, strategy: str) -> PipelineMethod:
    return PipelineMethod(ctx, strategy)


@register_method("auto")
def build_auto(ctx: MethodContext) -> PipelineMethod:
    method = PipelineMethod(ctx, "auto")
    method.name = "auto"
    return method
