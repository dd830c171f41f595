"""A differentiable inner loop: SGD steps on a (weighted) next-token loss, written functionally.

Meta-learning needs the gradient of an outer loss *through* the update a document causes. Here
parameters are plain dicts of tensors, the model is run with ``torch.func.functional_call``, and
each SGD step is ``p - lr * grad(loss, p, create_graph=True)``, so autograd can differentiate the
updated parameters with respect to whatever produced them: per-token weights (CaMeLS), the
starting point (a meta-trained LoRA init), or both. The same code serves LoRA parameters of a
PEFT model and the full parameters of a small model: callers choose the dict.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from torch.func import functional_call

from training.token_batches import IGNORE_INDEX, TokenBatch

Params = dict[str, torch.Tensor]


class InnerLoopConfig(BaseModel):
    """How a document updates the model inside meta-training."""

    lr: float = Field(1e-3, gt=0, description="inner SGD learning rate")
    steps: int = Field(1, ge=1, description="SGD steps on the same batch, unrolled")


def enable_double_backward(model: nn.Module) -> nn.Module:
    """Switch attention to the eager implementation: the fused SDPA kernels (flash on CPU,
    efficient/flash on CUDA) have no second derivative, which meta-gradients need."""
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            module.set_attn_implementation("eager")
            break
    return model


def select_params(model: nn.Module, which: Literal["trainable", "lora", "all"] = "trainable") -> Params:
    """The parameters an inner loop updates, by name (the names ``functional_call`` expects).

    ``lora``: the LoRA matrices of a PEFT model; ``trainable``: whatever requires grad;
    ``all``: every parameter (full fine-tuning of a small model).
    """
    named = dict(model.named_parameters())
    if which == "lora":
        return {n: p for n, p in named.items() if "lora_" in n}
    if which == "trainable":
        return {n: p for n, p in named.items() if p.requires_grad}
    if which == "all":
        return named
    raise ValueError(f"unknown parameter selection {which!r}")


def forward_logits(model: nn.Module, params: Params, batch: TokenBatch) -> torch.Tensor:
    """Logits of ``model`` with ``params`` substituted (others stay the module's own), at least
    float32 so bf16 models get stable losses and float64 checks keep their precision."""
    out = functional_call(
        model, params, (), {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                            "use_cache": False},
    )
    logits = out.logits
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_nll(model: nn.Module, params: Params, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token NLL ``[B, T-1]`` (target = token t+1) and the mask of positions that count."""
    logits = forward_logits(model, params, batch)[:, :-1]
    targets = batch.labels[:, 1:]
    mask = targets != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none"
    ).view_as(targets)
    return nll * mask, mask


def weighted_nll(
    model: nn.Module, params: Params, batch: TokenBatch, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over labelled tokens of ``weight(token) * NLL(token)``; weights are ``[B, T]``, one per
    input token, the weight of a token scaling the loss of predicting it. No weights = uniform 1,
    the ordinary LM loss, so uniform fine-tuning and CaMeLS share one code path."""
    nll, mask = token_nll(model, params, batch)
    if weights is not None:
        nll = nll * weights[:, 1:].to(nll.dtype)
    return nll.sum() / mask.sum().clamp(min=1)


def sgd_step(params: Params, loss: torch.Tensor, lr: float, create_graph: bool = True) -> Params:
    """``p - lr * dloss/dp`` for every parameter; with ``create_graph`` the result stays differentiable
    with respect to whatever ``params`` and ``loss`` depend on (second-order MAML)."""
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    updated = {}
    for name, grad in zip(names, grads):
        p = params[name]
        new = p if grad is None else p - lr * grad
        # First-order use (online adaptation, evaluation): fresh leaves, ready for the next step.
        updated[name] = new if create_graph else new.detach().requires_grad_(True)
    return updated


def inner_update(
    model: nn.Module,
    params: Params,
    batch: TokenBatch,
    weights: torch.Tensor | None = None,
    config: InnerLoopConfig | None = None,
    create_graph: bool = True,
) -> Params:
    """``config.steps`` unrolled SGD steps on the (weighted) LM loss of ``batch``.

    A batch of several documents makes one step on their pooled loss (the multi-document case).
    """
    config = config or InnerLoopConfig()
    for _ in range(config.steps):
        loss = weighted_nll(model, params, batch, weights)
        params = sgd_step(params, loss, config.lr, create_graph=create_graph)
    return params


def kl_from_base(
    model: nn.Module, base_params: Params, updated_params: Params, batch: TokenBatch
) -> torch.Tensor:
    """KL(base || updated) of the next-token distributions, averaged over labelled positions.

    The locality term of CaMeLS: on unrelated text an update should leave predictions alone.
    The base side is a constant (no gradient flows into it).
    """
    with torch.no_grad():
        base_logp = F.log_softmax(forward_logits(model, base_params, batch)[:, :-1], dim=-1)
    new_logp = F.log_softmax(forward_logits(model, updated_params, batch)[:, :-1], dim=-1)
    mask = (batch.labels[:, 1:] != IGNORE_INDEX).to(new_logp.dtype)
    kl = (base_logp.exp() * (base_logp - new_logp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def labelled_logprobs(model: nn.Module, params: Params, batch: TokenBatch) -> torch.Tensor:
    """Next-token log-probabilities ``[N, V]`` at the N labelled positions, in row-major order.

    Two batches that label the same answer tokens behind different prompts (the prompted teacher
    and the student) give rows that line up one to one.
    """
    logits = forward_logits(model, params, batch)[:, :-1]
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    return F.log_softmax(logits[mask], dim=-1)


def kl_to_teacher(model: nn.Module, params: Params, batch: TokenBatch, teacher_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) averaged over the labelled positions of ``batch``.

    ``teacher_logp`` comes from ``labelled_logprobs`` on the teacher's own batch (same answer
    tokens, prompt with the document), so the rows line up.
    """
    new_logp = labelled_logprobs(model, params, batch)
    return (teacher_logp.exp() * (teacher_logp - new_logp)).sum(-1).mean()
