"""Online fine-tuning baselines (the CaMeLS paper's comparisons): each ingested document is one
Adam step (batch 1) on a LoRA adapter of the base model, in stream order, with one optimizer for the
whole stream.

* ``uniform_ft``: the plain next-token loss, every token weighted 1.
* ``salient_spans_ft``: the loss only on tokens inside named entities and numbers.

``OnlineFineTuning`` takes any per-token weighting, so a learned one (CaMeLS) plugs in unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from training.batch_generation import generate_answers
from training.choice_scoring import choice_logprobs
from training.methods.protocol import MethodContext
from training.prompts import qa_messages
from training.lora import top_layers
from training.lora import linear_module_names
from training.salient_spans import salient_token_mask
from training.types import Document, Question

# (document) -> (token ids [T], weight per token [T]); weight t scales the loss of predicting token t.
TokenWeights = Callable[[Document], tuple[torch.Tensor, torch.Tensor]]


def online_lora_config(ctx: MethodContext) -> LoraConfig:
    cfg, model = ctx.config, ctx.model
    return LoraConfig(r=cfg.ft_lora_r, lora_alpha=cfg.ft_lora_alpha, lora_dropout=0.0,
                      target_modules=linear_module_names(model),
                      layers_to_transform=top_layers(model, cfg.ft_lora_top_layers), task_type="CAUSAL_LM")


class OnlineFineTuning:
    def __init__(self, ctx: MethodContext, name: str, token_weights: TokenWeights) -> None:
        self.ctx = ctx
        self.name = name
        self.token_weights = token_weights
        torch.manual_seed(0)  # the LoRA A matrices are random: same init for every run
        self.model = get_peft_model(ctx.model, online_lora_config(ctx))
        self.model.eval()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=ctx.config.ft_lr)
        self.steps = 0
        self.skipped_documents = 0  # documents with no weighted token (nothing to learn)
        self.last_loss: float | None = None

    def ingest(self, document: Document) -> None:
        ids, weights = self.token_weights(document)
        targets, target_weights = ids[1:], weights[1:].float()
        if targets.numel() == 0 or target_weights.sum() <= 0:
            self.skipped_documents += 1
            return
        device = self.model.device
        ids, targets, target_weights = ids.to(device), targets.to(device), target_weights.to(device)
        for _ in range(self.ctx.config.ft_steps_per_doc):
            logits = self.model(input_ids=ids[None]).logits[0, :-1].float()
            token_loss = F.cross_entropy(logits, targets, reduction="none")
            loss = (token_loss * target_weights).sum() / target_weights.sum()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.steps += 1
            self.last_loss = loss.item()

    def answer(self, questions: list[Question]) -> list[str]:
        prompts = [qa_messages(q.question) for q in questions]
        return generate_answers(self.model, self.ctx.tokenizer, prompts,
                                self.ctx.config.max_new_tokens, self.ctx.config.batch_size)

    def choice_scores(self, question: Question) -> list[float]:
        return choice_logprobs(self.model, self.ctx.tokenizer, qa_messages(question.question),
                               list(question.choices or ()))

    def stored_bytes(self) -> int:
        """The adapter and the optimizer state carried along the stream."""
        adapter = sum(p.numel() * p.element_size() for p in self.params)
        state = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t))
        return adapter + state

    def close(self) -> None:
        self.model.unload()  # removes the LoRA layers: the base model is as before


def uniform_weights(ctx: MethodContext) -> TokenWeights:
    def weights(document: Document) -> tuple[torch.Tensor, torch.Tensor]:
        ids = ctx.tokenizer(document.text, add_special_tokens=False, truncation=True,
                            max_length=ctx.config.ft_max_tokens, return_tensors="pt")["input_ids"][0]
        return ids, torch.ones(len(ids))
    return weights


def salient_weights(ctx: MethodContext) -> TokenWeights:
    def weights(document: Document) -> tuple[torch.Tensor, torch.Tensor]:
        return salient_token_mask(ctx.tokenizer, document.text, ctx.config.ft_max_tokens,
                                  ctx.config.ner_backend)
    return weights


def uniform_ft(ctx: MethodContext) -> OnlineFineTuning:
    return OnlineFineTuning(ctx, "uniform_ft", uniform_weights(ctx))


def salient_spans_ft(ctx: MethodContext) -> OnlineFineTuning:
    return OnlineFineTuning(ctx, "salient_spans_ft", salient_weights(ctx))
