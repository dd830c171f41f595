"""Methods that change only the prompt: nothing (``no_context``), the gold document
(``oracle_prompt``, the upper bound) and retrieved passages: BM25 (``rag_bm25``), MiniLM dense
(``rag_dense``) and both fused by reciprocal rank (``rag_hybrid``), all with the same passage
budget (``rag_k`` passages of ``rag_passage_words`` words)."""

from __future__ import annotations

from training.generation import generate_answers
from training.prefix_cache import PrefixCache, PrefixCacheConfig
from training.choice_scoring import choice_logprobs
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.prompts import qa_messages
from training.retrieval import BM25Index
from training.retrievers import Retriever, load_embedder, make_retriever
from training.types import Document, Question


def _cut(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


class _PromptedMethod:
    """Answers with the frozen base model; subclasses choose the passages."""

    name = "prompted"

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.documents: dict[str, Document] = {}

    def passages(self, question: Question) -> list[str] | None:
        return None

    def ingest(self, document: Document) -> None:
        self.documents[document.id] = document

    def answer(self, questions: list[Question]) -> list[str]:
        prompts = [qa_messages(q.question, self.passages(q)) for q in questions]
        return generate_answers(self.ctx.model, self.ctx.tokenizer, prompts,
                                self.ctx.config.max_new_tokens, self.ctx.config.batch_size)

    def choice_scores(self, question: Question) -> list[float]:
        return choice_logprobs(self.ctx.model, self.ctx.tokenizer,
                               qa_messages(question.question, self.passages(question)),
                               list(question.choices or ()))

    def stored_bytes(self) -> int:
        return sum(len(d.text.encode()) for d in self.documents.values())

    def close(self) -> None:
        self.documents.clear()


@register_method("no_context")
class NoContext(_PromptedMethod):
    """The base model as it is: what it knows without reading the stream."""

    name = "no_context"

    def ingest(self, document: Document) -> None:
        pass


@register_method("oracle_prompt")
class OraclePrompt(_PromptedMethod):
    """The question's own gold document(s) in the prompt: an upper bound for every method."""

    name = "oracle_prompt"

    def answer(self, questions: list[Question]) -> list[str]:
        # Several questions per document: each document's prompt prefix is computed once.
        prompts = [qa_messages(q.question, self.passages(q)) for q in questions]
        return generate_answers(self.ctx.model, self.ctx.tokenizer, prompts, self.ctx.config.max_new_tokens,
                                prefix_cache=PrefixCache(PrefixCacheConfig(max_mb=1024)))

    def passages(self, question: Question) -> list[str] | None:
        docs = [self.documents[d] for d in question.doc_ids if d in self.documents]
        return [_cut(d.text, self.ctx.config.max_passage_words) for d in docs] or None


@register_method("rag_bm25")
class RagBM25(_PromptedMethod):
    """Top-k BM25 passages over everything ingested so far; the index is rebuilt lazily."""

    name = "rag_bm25"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._index: BM25Index | None = None

    def ingest(self, document: Document) -> None:
        super().ingest(document)
        self._index = None

    def passages(self, question: Question) -> list[str] | None:
        if self._index is None:
            self._index = BM25Index(list(self.documents.values()), self.ctx.config.rag_passage_words)
        hits = self._index.search(question.question, self.ctx.config.rag_k)
        return [h.text for h in hits] or None


class _RagRetriever(_PromptedMethod):
    """Top-k passages of an incremental retriever (``training.retrievers``) over everything ingested."""

    kind = "dense"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self._index: Retriever = make_retriever(self.kind, load_embedder(ctx.config.encoder),
                                                max_words=ctx.config.rag_passage_words)

    def ingest(self, document: Document) -> None:
        super().ingest(document)
        self._index.add([document])

    def passages(self, question: Question) -> list[str] | None:
        hits = self._index.search(question.question, self.ctx.config.rag_k)
        return [h.text for h in hits] or None

    def close(self) -> None:
        self._index.remove(list(self.documents))
        super().close()


@register_method("rag_dense")
class RagDense(_RagRetriever):
    """Top-k passages by MiniLM cosine (the encoder MAC's keys use)."""

    name, kind = "rag_dense", "dense"


@register_method("rag_hybrid")
class RagHybrid(_RagRetriever):
    """Top-k passages by reciprocal-rank fusion (k = 60) of the BM25 and MiniLM rankings."""

    name, kind = "rag_hybrid", "hybrid"
