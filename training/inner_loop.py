"""A differentiable inner loop: the online update (``training.updates``) written functionally.

Meta-learning needs the gradient of an outer loss *through* the updates documents cause. Here
parameters are plain dicts of tensors, the model is run with ``torch.func.functional_call``, and
each step of the online optimizer (SGD, or Adam with its moments kept as tensors) is computed from
``grad(loss, p, create_graph=True)``, so autograd can differentiate the updated parameters with
respect to whatever produced them: per-token weights (CaMeLS), the starting point (a meta-trained
LoRA init), a learned lr, or all of them. ``stream_update`` unrolls a stream of k documents with one
optimizer state, as the harness and the service take them, with truncated (``window``) or
first-order (``first_order``) backpropagation where memory requires. The same code serves LoRA
parameters of a PEFT model and the full parameters of a small model: callers choose the dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from training.token_batches import IGNORE_INDEX, TokenBatch
from training.updates import ADAM_BETAS, ADAM_EPS, UpdateConfig

Params = dict[str, torch.Tensor]


class InnerLoopConfig(BaseModel):
    """How documents update the model inside meta-training: the online update's optimizer, lr and
    steps per document (``training.updates.UpdateConfig``, see ``of_update``), and how much of the
    unrolled update is differentiated (the memory / exactness trade-off)."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["sgd", "adam"] = Field("sgd", description="the online update's optimizer")
    lr: float = Field(1e-3, gt=0, description="inner learning rate (a learned lr tensor overrides it)")
    steps: int = Field(1, ge=1, description="optimizer steps per document, unrolled")
    window: int | None = Field(
        None, ge=1, description="truncated backpropagation: only the last N documents' steps are differentiated; "
                                "earlier ones pass gradients to the start and the lr only (none: every step)")
    first_order: bool = Field(
        False, description="drop the second-order terms: each step's gradient is taken at detached parameters "
                           "(still differentiable in token weights, lr and the start point)")

    @classmethod
    def of_update(cls, update: UpdateConfig, **fields) -> "InnerLoopConfig":
        """The online update ``update`` as meta-training unrolls it."""
        return cls(optimizer=update.optimizer, lr=update.lr, steps=update.steps_per_document, **fields)

    def differentiated(self, index: int, count: int) -> bool:
        """Whether the step of document ``index`` of ``count`` is differentiated (inside the window)."""
        return self.window is None or index >= count - self.window


@dataclass
class OptimizerState:
    """What the online optimizer carries from one document to the next: the step count and, for
    Adam, ``exp_avg`` / ``exp_avg_sq`` (torch.optim.Adam's state), as tensors that may stay in the
    graph, so meta-gradients see how one document's step shapes the next ones."""

    step: int = 0
    exp_avg: Params = field(default_factory=dict)
    exp_avg_sq: Params = field(default_factory=dict)

    def detached(self) -> "OptimizerState":
        return OptimizerState(self.step, {n: t.detach() for n, t in self.exp_avg.items()},
                              {n: t.detach() for n, t in self.exp_avg_sq.items()})


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


def optimizer_step(
    params: Params, grads: dict[str, torch.Tensor | None], state: OptimizerState,
    optimizer: Literal["sgd", "adam"], lr: float | torch.Tensor,
) -> tuple[Params, OptimizerState]:
    """One step of ``torch.optim.SGD`` / ``torch.optim.Adam`` as ``training.updates`` builds them,
    written functionally: the result is differentiable in the parameters, the gradients, the state
    and ``lr`` (a tensor for a learned lr). A parameter without a gradient is left as it is.

    Adam's first step is ``lr * g / (|g| + eps)``, about ``lr * sign(g)``: its derivative in ``g``,
    ``lr * eps / (|g| + eps)**2``, is negligible where ``|g| >> sqrt(eps)`` and steep where ``g`` is
    near 0, so meta-gradients through it come mostly from near-zero gradient coordinates. Later
    steps depend on the ratio of each gradient to the moments of the earlier ones: that is how
    token weights shape a stream of Adam steps.
    """
    step = state.step + 1
    if optimizer == "sgd":
        return {n: p if grads[n] is None else p - lr * grads[n] for n, p in params.items()}, OptimizerState(step)
    beta1, beta2 = ADAM_BETAS
    step_size = lr / (1 - beta1 ** step)
    correction2 = math.sqrt(1 - beta2 ** step)
    updated, exp_avg, exp_avg_sq = {}, dict(state.exp_avg), dict(state.exp_avg_sq)
    for name, p in params.items():
        g = grads[name]
        if g is None:
            updated[name] = p
            continue
        m = (1 - beta1) * g if name not in exp_avg else beta1 * exp_avg[name] + (1 - beta1) * g
        v = (1 - beta2) * g * g if name not in exp_avg_sq else beta2 * exp_avg_sq[name] + (1 - beta2) * g * g
        # sqrt has an infinite derivative at 0, where a LoRA A matrix's gradient is while B = 0;
        # clamping at the smallest normal number changes the value by < 1e-18, far below eps.
        denom = v.clamp_min(torch.finfo(v.dtype).tiny).sqrt() / correction2 + ADAM_EPS
        updated[name] = p - step_size * m / denom
        exp_avg[name], exp_avg_sq[name] = m, v
    return updated, OptimizerState(step, exp_avg, exp_avg_sq)


def _inner_step(
    model: nn.Module, params: Params, batch: TokenBatch, weights: torch.Tensor | None, config: InnerLoopConfig,
    lr: float | torch.Tensor, state: OptimizerState, differentiated: bool, keep_graph: bool,
) -> tuple[Params, OptimizerState]:
    """One optimizer step on the (weighted) LM loss of ``batch``.

    ``differentiated``: the step's gradient stays in the graph (second order unless
    ``config.first_order``: then it is taken at detached parameters but still depends on the token
    weights). Otherwise the step's direction is a constant: ``params - lr * direction`` keeps only
    the identity path to the start point and the path to ``lr``. ``keep_graph`` false: plain
    first-order use (evaluation), the result is fresh leaves.
    """
    second_order = differentiated and not config.first_order
    at = params if second_order else {n: p.detach().requires_grad_(True) for n, p in params.items()}
    if weights is not None and not differentiated:
        weights = weights.detach()
    loss = weighted_nll(model, at, batch, weights)
    create_graph = differentiated and (second_order or (weights is not None and weights.requires_grad))
    grads = dict(zip(at, torch.autograd.grad(loss, list(at.values()), create_graph=create_graph, allow_unused=True)))
    if not differentiated:
        state = state.detached()
    updated, state = optimizer_step(params, grads, state, config.optimizer, lr)
    if not keep_graph:
        updated, state = {n: p.detach().requires_grad_(True) for n, p in updated.items()}, state.detached()
    return updated, state


def stream_update(
    model: nn.Module,
    params: Params,
    documents: Sequence[TokenBatch],
    weights: Sequence[torch.Tensor | None] | None = None,
    config: InnerLoopConfig | None = None,
    lr: float | torch.Tensor | None = None,
    create_graph: bool = True,
    state: OptimizerState | None = None,
) -> tuple[Params, OptimizerState]:
    """The online update over a stream: ``config.steps`` optimizer steps per document, documents in
    order, one optimizer state throughout (``training.updates.OnlineUpdater`` on the same documents,
    written functionally). Returns the final parameters and optimizer state.

    With ``create_graph`` the result is differentiable with respect to the start point, the token
    weights and ``lr`` (a tensor: a learned lr; else ``config.lr``), exactly (second order) for the
    last ``config.window`` documents and first-order before them. A batch of several documents is
    one step on their pooled loss.
    """
    config = config or InnerLoopConfig()
    weights = list(weights) if weights is not None else [None] * len(documents)
    state = state or OptimizerState()
    lr = config.lr if lr is None else lr
    for index, (batch, w) in enumerate(zip(documents, weights, strict=True)):
        for _ in range(config.steps):
            params, state = _inner_step(model, params, batch, w, config, lr, state,
                                        differentiated=create_graph and config.differentiated(index, len(documents)),
                                        keep_graph=create_graph)
    return params, state


def inner_update(
    model: nn.Module,
    params: Params,
    batch: TokenBatch,
    weights: torch.Tensor | None = None,
    config: InnerLoopConfig | None = None,
    create_graph: bool = True,
) -> Params:
    """``config.steps`` unrolled steps on the (weighted) LM loss of one batch from a fresh optimizer
    state: ``stream_update`` of a one-document stream."""
    return stream_update(model, params, [batch], [weights], config, create_graph=create_graph)[0]


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
