"""``meta_ft`` in the evaluation harness: plain optimizer steps from the meta-trained init.

Each document (or each group of ``docs_per_step`` documents, pooled into one loss: the
multi-document case) is ONE step of ``training.updates`` (the service's update) with the optimizer
(SGD, or Adam carried along the stream) and the learning rate the init was meta-trained for (or
``MethodConfig.meta_ft_lr``, which the harness can choose on val like ``uniform_ft``'s), on the
LoRA adapter (variant ``lora``) or on the adapted weight matrices with the rank-1 init merged
(variant ``rank1_full``): exactly the inner step of meta-training, taken with a plain optimizer.
Registered as ``meta_ft`` (``MethodConfig.meta_ft_docs_per_step``, default 1), ``meta_ft_4`` and
``meta_ft_16``. ``meta_ft_isolated`` is the meta-training (and the paper's) setting instead of the
stream: each question is answered right after one step from the init on its own document only,
then the init is restored; the gap to ``meta_ft`` is what accumulating steps over a stream costs.
The artifact comes from ``MethodConfig.meta_ft_artifact``, else ``$FRESHLM_META_FT_ARTIFACT``, else
the shipped artifact for the base model.
"""

from __future__ import annotations

import torch

from training.generation import generate_answers
from training.choice_scoring import choice_logprobs
from training.artifacts import configured_artifact
from training.meta_ft.adapter import load_meta_adapter, online_update, read_meta_init
from training.methods.online_ft import update_config
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.prompts import qa_messages
from training.types import Document, Question
from training.updaters import load_updater
from training.updates import LoraUpdater, OnlineUpdater, uniform_weights


class MetaFineTuning:
    def __init__(self, ctx: MethodContext, name: str, docs_per_step: int, isolated: bool = False) -> None:
        self.ctx, self.name, self.docs_per_step, self.isolated = ctx, name, docs_per_step, isolated
        self.documents: dict[str, Document] = {}  # isolated: kept until their questions come
        path = configured_artifact("meta-ft", ctx.config.meta_ft_artifact, "FRESHLM_META_FT_ARTIFACT",
                                   ctx.config.base_model)
        self.adapter, _ = read_meta_init(path, ctx.model.config)
        self._original: dict[str, torch.Tensor] = {}
        if self.adapter.variant == "lora":  # the service's meta-trained updater, exactly
            spec = load_updater(path, ctx.model, ctx.tokenizer, update_config(ctx.config), lr=ctx.config.meta_ft_lr)
            self.updater: OnlineUpdater = LoraUpdater(ctx.model, ctx.tokenizer, spec.token_weights, spec.config,
                                                      initial=spec.initial)
        else:  # rank1_full merges into and then steps the base weights in place: keep the originals
            self._requires_grad = {n: p.requires_grad for n, p in ctx.model.named_parameters()}
            self._original = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
            model, params, _ = load_meta_adapter(path, ctx.model)
            update = online_update(self.adapter, update_config(ctx.config), ctx.config.meta_ft_lr)
            self.updater = OnlineUpdater(model, list(params.values()), ctx.tokenizer,
                                         uniform_weights(ctx.tokenizer, update.max_tokens), update)
        self.model = self.updater.model
        self.pending: list[Document] = []

    def ingest(self, document: Document) -> None:
        if self.isolated:
            self.documents[document.id] = document
            return
        self.pending.append(document)
        if len(self.pending) >= self.docs_per_step:
            self._step()

    def _step(self) -> None:
        """One SGD step on the pooled LM loss of the pending documents (the meta-trained update)."""
        if self.pending:
            self.updater.step([d.text for d in self.pending])
            self.pending = []

    def _each_from_own_document(self, questions: list[Question], ask) -> list:
        """Isolated protocol: per supporting document(s), one step from the init, ask, restore the init."""
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(tuple(q.doc_ids), []).append(i)
        init = self.updater.snapshot()
        out: dict[int, object] = {}
        for doc_ids, idx in groups.items():
            self.pending = [self.documents[d] for d in doc_ids if d in self.documents]
            self._step()
            out.update(zip(idx, ask([questions[i] for i in idx])))
            self.updater.restore(init)
        return [out[i] for i in range(len(questions))]

    def answer(self, questions: list[Question]) -> list[str]:
        if self.isolated:
            return self._each_from_own_document(questions, self._generate)
        self._step()  # a partial group is learned before answering
        return self._generate(questions)

    def _generate(self, questions: list[Question]) -> list[str]:
        prompts = [qa_messages(q.question) for q in questions]
        return generate_answers(self.model, self.ctx.tokenizer, prompts,
                                self.ctx.config.max_new_tokens, self.ctx.config.batch_size)

    def choice_scores(self, question: Question) -> list[float]:
        if self.isolated:
            return self._each_from_own_document([question], lambda qs: [self._choices(qs[0])])[0]
        self._step()
        return self._choices(question)

    def _choices(self, question: Question) -> list[float]:
        return choice_logprobs(self.model, self.ctx.tokenizer, qa_messages(question.question),
                               list(question.choices or ()))

    def stored_bytes(self) -> int:
        """What differs from the base model: the adapter, or the edited weight matrices."""
        return sum(p.numel() * p.element_size() for p in self.updater.params)

    def report(self) -> dict[str, int]:
        return {"steps": self.updater.steps, "skipped_documents": self.updater.skipped,
                "rejected_updates": self.updater.rejected}

    def close(self) -> None:
        if isinstance(self.updater, LoraUpdater):
            self.updater.unload()  # removes the LoRA layers
            return
        with torch.no_grad():  # the rank-1 variant edited weights in place: put them back
            for n, p in self.ctx.model.named_parameters():
                if n in self._original:
                    p.copy_(self._original[n])
                p.requires_grad_(self._requires_grad.get(n, p.requires_grad))


def _builder(name: str, docs_per_step: int | None, isolated: bool = False):
    def build(ctx: MethodContext) -> MetaFineTuning:
        n = docs_per_step or getattr(ctx.config, "meta_ft_docs_per_step", 1) or 1
        return MetaFineTuning(ctx, name, n, isolated)
    return build


register_method("meta_ft", lr_field="meta_ft_lr")(_builder("meta_ft", None))
register_method("meta_ft_4", lr_field="meta_ft_lr")(_builder("meta_ft_4", 4))
register_method("meta_ft_16", lr_field="meta_ft_lr")(_builder("meta_ft_16", 16))
register_method("meta_ft_isolated")(_builder("meta_ft_isolated", 1, isolated=True))
