"""Online fine-tuning baselines (the CaMeLS paper's comparisons): each ingested document is one
optimizer step (batch 1) on a LoRA adapter of the base model, in stream order, with one optimizer
for the whole stream: ``training.updates.LoraUpdater``, the update the service runs.

* ``uniform_ft``: the plain next-token loss, every token weighted 1.
* ``salient_spans_ft``: the loss only on tokens inside named entities and numbers.

``OnlineFineTuning`` takes any per-token weighting, so a learned one (CaMeLS) plugs in unchanged.
"""

from __future__ import annotations

import torch

from training.generation import generate_answers
from training.choice_scoring import choice_logprobs
from training.methods.protocol import MethodConfig, MethodContext
from training.methods.registry import register_method
from training.prompts import qa_messages
from training.salient_spans import salient_token_mask
from training.types import Document, Question
from training.updates import LoraUpdater, TokenWeights, UpdateConfig, uniform_weights


def update_config(config: MethodConfig) -> UpdateConfig:
    """The harness's ``ft_*`` settings as the update the service would run."""
    return UpdateConfig(optimizer="adam", lr=config.ft_lr, steps_per_document=config.ft_steps_per_doc,
                        max_tokens=config.ft_max_tokens, max_drift=config.ft_max_drift,
                        lora={"rank": config.ft_lora_r, "alpha": config.ft_lora_alpha,
                              "top_layers": config.ft_lora_top_layers})


class OnlineFineTuning:
    def __init__(self, ctx: MethodContext, name: str, token_weights: TokenWeights,
                 config: UpdateConfig | None = None, initial: dict[str, torch.Tensor] | None = None) -> None:
        self.ctx = ctx
        self.name = name
        self.updater = LoraUpdater(ctx.model, ctx.tokenizer, token_weights, config or update_config(ctx.config),
                                   initial=initial)
        self.model = self.updater.model

    def ingest(self, document: Document) -> None:
        self.updater.step(document.text)

    def answer(self, questions: list[Question]) -> list[str]:
        prompts = [qa_messages(q.question) for q in questions]
        return generate_answers(self.model, self.ctx.tokenizer, prompts,
                                self.ctx.config.max_new_tokens, self.ctx.config.batch_size)

    def choice_scores(self, question: Question) -> list[float]:
        return choice_logprobs(self.model, self.ctx.tokenizer, qa_messages(question.question),
                               list(question.choices or ()))

    def stored_bytes(self) -> int:
        return self.updater.adapter_bytes()

    def report(self) -> dict[str, int]:
        return {"steps": self.updater.steps, "skipped_documents": self.updater.skipped,
                "rejected_updates": self.updater.rejected}

    def close(self) -> None:
        self.updater.unload()


def salient_weights(ctx: MethodContext) -> TokenWeights:
    def weights(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return salient_token_mask(ctx.tokenizer, text, ctx.config.ft_max_tokens, ctx.config.ner_backend)
    return weights


@register_method("uniform_ft", lr_field="ft_lr")
def uniform_ft(ctx: MethodContext) -> OnlineFineTuning:
    return OnlineFineTuning(ctx, "uniform_ft", uniform_weights(ctx.tokenizer, ctx.config.ft_max_tokens))


@register_method("salient_spans_ft", lr_field="ft_lr")
def salient_spans_ft(ctx: MethodContext) -> OnlineFineTuning:
    return OnlineFineTuning(ctx, "salient_spans_ft", salient_weights(ctx))
