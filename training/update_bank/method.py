"""``update_bank`` in the evaluation harness: ``training.update_bank.runtime.UpdateBankRuntime`` over
the in-process memory bank.

Ingesting a document is one step of the online update from the init on that document alone (the
step ``meta_ft_isolated`` measures), kept as the document's entry; answering applies each
question's top-k entries by MiniLM key through per-request PEFT adapters. The updater is
``MethodConfig.update_bank.updater`` (default: the meta_ft artifact, as ``meta_ft`` resolves it),
its lr ``MethodConfig.meta_ft_lr`` (chosen on val with ``--meta-ft-lr-grid``) or the init's own.
"""

from __future__ import annotations

from training.artifacts import configured_artifact
from training.memory import InMemoryMemoryBank
from training.methods.online_ft import update_config
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.types import Document, Question
from training.update_bank.runtime import build_update_bank


class UpdateBankMethod:
    name = "update_bank"

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        config = ctx.config.update_bank
        updater = config.updater or str(configured_artifact(
            "meta-ft", ctx.config.meta_ft_artifact, "FRESHLM_META_FT_ARTIFACT", ctx.config.base_model))
        self.runtime = build_update_bank(ctx.model, ctx.tokenizer, update_config(ctx.config),
                                         InMemoryMemoryBank(config.storage), config, updater, lr=ctx.config.meta_ft_lr)
        self.entries = 0  # entries stored (the bank is cleared on close, before the harness reports)

    @property
    def model(self):
        return self.runtime.model

    def ingest(self, document: Document) -> None:
        self.entries += self.runtime.memorize([document.id], [document.text])

    def delete(self, doc_id: str) -> bool:
        return self.runtime.delete(doc_id)

    def answer(self, questions: list[Question]) -> list[str]:
        answered = self.runtime.answer([q.question for q in questions], max_new_tokens=self.ctx.config.max_new_tokens)
        return [text for text, _ in answered]

    def choice_scores(self, question: Question) -> list[float]:
        return self.runtime.choice_scores(question.question, list(question.choices or ()))

    def stored_bytes(self) -> int:
        return self.runtime.stored_bytes()

    def report(self) -> dict[str, int]:
        updater = self.runtime.updater
        return {"entries": self.entries, "skipped_documents": updater.skipped,
                "rejected_updates": updater.rejected}

    def close(self) -> None:
        self.runtime.bank.clear()
        self.runtime.updater.unload()  # removes the init's adapter and the slots


@register_method("update_bank", lr_field="meta_ft_lr")
def update_bank_method(ctx: MethodContext) -> UpdateBankMethod:
    return UpdateBankMethod(ctx)
