"""The one online update: a document becomes an optimizer step on an adapter of the base model.

    token weights (uniform / CaMeLS / salient spans) -> weighted next-token loss -> optimizer step
    (Adam or SGD) -> optional guard (finite loss, bounded drift on a locality probe)

``uniform_ft``, ``salient_spans_ft``, ``camels_ft`` and ``meta_ft`` in the harness and the service's
adapter updater are all this class; they differ only in the token weights, the starting adapter
and the optimizer settings (``UpdateConfig``). The service adds versioning and persistence around
it (``service.adapters.publisher``): what the harness measures is what the service does.

The loss of one step over documents ``d`` is ``sum_t w_t * nll_t / sum_t w_t`` over all their tokens
(token t's weight scales the loss of predicting it); one document per step is the stream setting.
A step the guard rejects is undone completely, optimizer state included.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.lora import LoraSpec
from training.token_batches import document_batch

# text -> (token ids [T], weight per token [T]); weight t scales the loss of predicting token t
TokenWeights = Callable[[str], tuple[torch.Tensor, torch.Tensor]]

# The optimizers' settings other than lr, shared with the differentiable copy of this update that
# meta-training unrolls (``training.inner_loop.optimizer_step``): torch's Adam defaults, written once.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8

LOCALITY_PROBE = (
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A week has seven days, and a year has twelve months.",
)


class UpdateConfig(BaseModel):
    """How one document changes the adapter. Defaults: ``uniform_ft`` as the harness chose it on
    the news validation stream (RealTimeQA 2023: Adam, lr 5e-4, LoRA r16 on every linear layer)."""

    model_config = ConfigDict(extra="forbid")

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0)
    lora: LoraSpec = Field(default_factory=lambda: LoraSpec(rank=16))
    steps_per_document: int = Field(1, ge=1)
    max_tokens: int = Field(512, ge=2, description="document tokens one update reads")
    max_drift: float | None = Field(
        None, gt=0, description="guard: largest mean KL(old || new) on the locality probe (none: no drift bound; "
                                "a non-finite loss is always rejected)")
    seed: int = Field(0, description="seeds the LoRA A matrices: the same config gives the same initial adapter")


@dataclass
class UpdateResult:
    accepted: bool
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why the step was rejected or skipped


def uniform_weights(tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> TokenWeights:
    """Every token weight 1: plain online fine-tuning."""
    def weights(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = document_batch(tokenizer, [text], max_tokens).input_ids[0]
        return ids, torch.ones(len(ids))
    return weights


def model_weights(tokenizer: PreTrainedTokenizerBase, max_tokens: int, weighting_model: nn.Module) -> TokenWeights:
    """Weights a network reads off the document (CaMeLS): ``weighting_model(ids [1, T]) -> [1, T]``."""
    def weights(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = document_batch(tokenizer, [text], max_tokens).input_ids[0]
        device = next(weighting_model.parameters()).device
        with torch.no_grad():
            return ids, weighting_model(ids[None].to(device))[0].float().cpu()
    return weights


class OnlineUpdater:
    """Steps ``params`` of ``model`` (by default: a fresh LoRA adapter on ``base``) one document at a time."""

    def __init__(
        self,
        model: nn.Module,
        params: list[torch.Tensor],
        tokenizer: PreTrainedTokenizerBase,
        token_weights: TokenWeights,
        config: UpdateConfig,
    ) -> None:
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.token_weights, self.config = token_weights, config
        self.optimizer = (torch.optim.Adam(params, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
                          if config.optimizer == "adam" else torch.optim.SGD(params, lr=config.lr))
        self.steps = 0
        self.rejected = 0
        self.skipped = 0  # documents with nothing to learn (too short, no weighted token)
        self._probe = None
        self._probe_logp: torch.Tensor | None = None  # probe log-probs of the current weights

    # --- the step -------------------------------------------------------------------------------

    def step(self, texts: str | list[str]) -> UpdateResult:
        """``steps_per_document`` optimizer steps on the weighted LM loss of ``texts`` (pooled),
        kept only if the guard accepts them."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = [self.token_weights(t) for t in texts]
        # a document is skipped only if no weight is positive; NaN weights go on to be rejected as a non-finite loss
        rows = [(ids, w.float()) for ids, w in rows if len(ids) >= 2 and not float(w[1:].sum()) <= 0]
        if not rows:
            self.skipped += 1
            return UpdateResult(False, reason="no token to learn from (document too short or no weighted token)")
        guarded = self.config.max_drift is not None
        before = self.probe_logp() if guarded else None
        snapshot = self.snapshot()
        device = self.params[0].device
        loss_value = float("nan")
        for _ in range(self.config.steps_per_document):
            total, weight_sum = 0.0, sum(float(w[1:].sum()) for _, w in rows)
            for ids, w in rows:
                ids = ids.to(device)
                logits = self.model(input_ids=ids[None]).logits[0, :-1].float()
                token_loss = F.cross_entropy(logits, ids[1:], reduction="none")
                loss = (token_loss * w[1:].to(device)).sum() / weight_sum
                loss.backward()
                total += float(loss.detach())
            loss_value = total
            if not math.isfinite(loss_value):
                break
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": loss_value, "tokens": sum(len(ids) for ids, _ in rows)}
        reason = None if math.isfinite(loss_value) else f"loss is not finite ({loss_value})"
        if reason is None and guarded:
            self._probe_logp = None
            after = self.probe_logp()
            mask = self._probe.attention_mask.bool()
            drift = float((before.exp() * (before - after)).sum(-1)[mask].mean())
            metrics["drift"] = drift
            if not math.isfinite(drift) or drift > self.config.max_drift:
                reason = f"locality drift {drift:.4g} exceeds the bound {self.config.max_drift}"
        if reason is not None:
            self.restore(snapshot)
            self._probe_logp = before
            self.rejected += 1
            return UpdateResult(False, metrics, reason)
        self.steps += self.config.steps_per_document
        return UpdateResult(True, metrics)

    @torch.no_grad()
    def probe_logp(self) -> torch.Tensor:
        """Next-token log-probabilities on the locality probe under the current weights (cached)."""
        if self._probe is None:
            self._probe = document_batch(self.tokenizer, list(LOCALITY_PROBE), 64).to(self.params[0].device)
        if self._probe_logp is None:
            logits = self.model(input_ids=self._probe.input_ids, attention_mask=self._probe.attention_mask).logits
            self._probe_logp = F.log_softmax(logits.float(), -1)
        return self._probe_logp

    # --- state: what a version persists -----------------------------------------------------------

    def snapshot(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """The parameters and the optimizer state (``restore`` undoes every step taken since)."""
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())

    @torch.no_grad()
    def restore(self, snapshot: tuple[list[torch.Tensor], dict[str, Any]]) -> None:
        params, optimizer_state = snapshot
        for p, saved in zip(self.params, params):
            p.copy_(saved)
        self.optimizer.load_state_dict(optimizer_state)
        self._probe_logp = None

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer state as flat tensors (``<param index>.<name>``), for safetensors."""
        out = {}
        for index, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                out[f"{index}.{name}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor] | None) -> None:
        """Restore what ``optimizer_tensors`` saved (``None`` or empty: a fresh optimizer)."""
        state_dict = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in (tensors or {}).items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        state_dict["state"] = state
        self.optimizer.load_state_dict(state_dict)


# --- LoRA updaters --------------------------------------------------------------------------------


class LoraUpdater(OnlineUpdater):
    """An ``OnlineUpdater`` on a LoRA adapter named ``adapter_name`` of ``base`` (wrapped in place,
    ``unload`` gives the base model back unchanged). ``initial``: the adapter's starting tensors
    (a meta-trained init); otherwise a fresh adapter (B = 0, A seeded), so it starts as the base."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        token_weights: TokenWeights,
        config: UpdateConfig,
        initial: dict[str, torch.Tensor] | None = None,
        adapter_name: str = "default",
    ) -> None:
        self.adapter_name = adapter_name
        torch.manual_seed(config.seed)  # the LoRA A matrices are random: same init for every run
        peft = get_peft_model(base, config.lora.peft_config(base), adapter_name=adapter_name).eval()
        params = [p for n, p in peft.named_parameters() if p.requires_grad]
        super().__init__(peft, params, tokenizer, token_weights, config)
        if initial is not None:
            self.load_adapter(initial)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.model, adapter_name=self.adapter_name)
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_adapter(self, tensors: dict[str, torch.Tensor], optimizer: dict[str, torch.Tensor] | None = None) -> None:
        """Make the adapter (and the optimizer) what a version saved."""
        dtype = self.params[0].dtype
        result = set_peft_model_state_dict(self.model, {k: v.to(dtype) for k, v in tensors.items()},
                                           adapter_name=self.adapter_name)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter weights do not fit the adapter: {result.unexpected_keys[:3]}")
        self.load_optimizer_tensors(optimizer)
        self._probe_logp = None

    def adapter_bytes(self) -> int:
        """The adapter and the optimizer state carried along the stream."""
        adapter = sum(p.numel() * p.element_size() for p in self.params)
        state = sum(t.numel() * t.element_size() for t in self.optimizer_tensors().values())
        return adapter + state

    def unload(self) -> PreTrainedModel:
        """Remove the LoRA layers: the base model is as before."""
        return self.model.unload()
