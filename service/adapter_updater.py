"""Single-step document updates of the live LoRA adapter, applied to a shadow copy and guarded.

The worker keeps its own copy of the base model with one LoRA adapter holding the live version.
For each document it takes one SGD step on the (token-weighted) next-token loss, then checks the
result: the loss must be finite and the drift on a fixed locality probe (mean KL of the next-token
distributions, old || new) bounded. A rejected step is undone; an accepted one becomes a new
immutable version (``service.adapter_store``) that the API swaps in atomically.

Token weights come from the configured updater: a CaMeLS weighting-model artifact (learned weights
per token), a meta-trained init (``meta_ft_init``, variant ``lora``: uniform weights from the
meta-learned starting adapter at its inner learning rate), or ``uniform`` (every token 1, the
plain online fine-tuning baseline).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.lora import linear_module_names
from training.token_batches import document_batch

ADAPTER = "live"
LOCALITY_PROBE = [
    "The sun rises in the east and sets in the west.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "A week has seven days, and a year has twelve months.",
]
TokenWeights = Callable[[torch.Tensor], torch.Tensor]  # input ids [1, T] -> weights [T]


def lora_config_dict(model: PreTrainedModel, rank: int) -> dict[str, Any]:
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": linear_module_names(model), "lora_dropout": 0.0}


def lora_config(config: dict[str, Any]) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", **config)


@dataclass
class UpdaterSpec:
    """What an updater artifact (or ``uniform``) means for the live adapter."""

    token_weights: TokenWeights
    lora: dict[str, Any]
    lr: float
    initial: dict[str, torch.Tensor] | None = None  # first version's weights (None: fresh LoRA, B = 0)
    info: dict[str, Any] = field(default_factory=dict)


def uniform_weights(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones(ids.shape[-1])


def load_updater(spec: str, base: PreTrainedModel, rank: int, lr: float) -> UpdaterSpec:
    """``uniform``; a CaMeLS weighting-model artifact (learned per-token weights on a fresh LoRA);
    or a meta-trained init artifact (variant ``lora``: its adapter is the first version and its
    inner learning rate the step size). Artifacts for another base model are refused."""
    if spec == "uniform":
        return UpdaterSpec(uniform_weights, lora_config_dict(base, rank), lr, info={"updater": "uniform"})
    from training.artifacts import ArtifactError, read_manifest

    manifest = read_manifest(spec)
    info = {"updater": manifest.kind, "artifact": str(spec), "artifact_created_at": manifest.created_at.isoformat()}
    if manifest.kind == "camels_weighting_model":
        from training.camels.weighting_model import load_weighting_model

        model = load_weighting_model(spec, base)

        @torch.no_grad()
        def weights(ids: torch.Tensor) -> torch.Tensor:
            return model(ids.to(next(model.parameters()).device))[0].float().cpu()

        return UpdaterSpec(weights, lora_config_dict(base, rank), lr, info=info)
    if manifest.kind == "meta_ft_init":
        from peft import get_peft_model_state_dict as state_of

        from training.meta_ft.adapter import load_meta_adapter
        from training.lora import top_layers

        peft, _params, config = load_meta_adapter(spec, copy.deepcopy(base))
        if config.variant != "lora":
            raise ArtifactError(f"{spec}: meta-trained variant {config.variant!r} updates full weight matrices; "
                                "the service versions LoRA adapters only (use a 'lora' variant artifact)")
        lora = {"r": config.rank, "lora_alpha": config.alpha, "lora_dropout": 0.0,
                "target_modules": config.targets or linear_module_names(base),
                "layers_to_transform": top_layers(base, config.top_layers)}
        initial = {k: v.detach().cpu().clone() for k, v in state_of(peft).items()}
        return UpdaterSpec(uniform_weights, lora, config.inner_lr, initial=initial, info=info)
    raise ArtifactError(f"{spec} holds a {manifest.kind!r} artifact, not an updater "
                        "(expected camels_weighting_model or meta_ft_init)")


@dataclass
class UpdateResult:
    tensors: dict[str, torch.Tensor] | None
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: str | None = None


class AdapterUpdater:
    """Owns a private copy of the base model with the live adapter (never shared with answering)."""

    def __init__(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: UpdaterSpec,
        max_tokens: int, max_drift: float,
    ) -> None:
        self.tokenizer = tokenizer
        self.config = spec.lora
        self.lr, self.max_tokens, self.max_drift = spec.lr, max_tokens, max_drift
        self.token_weights = spec.token_weights
        torch.manual_seed(0)  # the LoRA A matrices are random: the initial version is reproducible
        self.model = get_peft_model(copy.deepcopy(base), lora_config(spec.lora), adapter_name=ADAPTER)
        self.model.eval()
        self.params = [p for n, p in self.model.named_parameters() if p.requires_grad]
        self.probe = document_batch(tokenizer, LOCALITY_PROBE, max_tokens=64).to(self.model.device)
        self._probe_cache: torch.Tensor | None = None  # probe log-probs of the current weights
        if spec.initial is not None:
            self.load(spec.initial)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=ADAPTER).items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        result = set_peft_model_state_dict(self.model, tensors, adapter_name=ADAPTER)
        self._probe_cache = None
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter weights do not fit the live adapter: {result.unexpected_keys[:3]}")

    @torch.no_grad()
    def _probe_logp(self) -> torch.Tensor:
        logits = self.model(input_ids=self.probe.input_ids, attention_mask=self.probe.attention_mask).logits
        return F.log_softmax(logits.float(), -1)

    def step(self, text: str) -> UpdateResult:
        """One weighted SGD step from the current weights; undone unless the guard accepts it."""
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            return UpdateResult(None, rejected="document too short for an update")
        weights = self.token_weights(ids)[1:].to(self.model.device)
        if float(weights.sum()) <= 0:
            return UpdateResult(None, rejected="no token has a positive weight")
        before = self._probe_cache if self._probe_cache is not None else self._probe_logp()
        snapshot = [p.detach().clone() for p in self.params]
        ids = ids.to(self.model.device)
        self.model.train(False)
        with torch.enable_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            token_loss = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            loss = (token_loss * weights).sum() / weights.sum()
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                if g is not None:
                    p.sub_(self.lr * g)
        loss_value = float(loss.detach())
        mask = self.probe.attention_mask.bool()
        after = self._probe_logp()
        drift = float((before.exp() * (before - after)).sum(-1)[mask].mean())
        metrics = {"loss": loss_value, "drift": drift, "tokens": int(ids.shape[1])}
        reason = None
        if not math.isfinite(loss_value):
            reason = f"loss is not finite ({loss_value})"
        elif not math.isfinite(drift) or drift > self.max_drift:
            reason = f"locality drift {drift:.4g} exceeds the bound {self.max_drift}"
        if reason is not None:
            self.restore(snapshot)
            self._probe_cache = before
            return UpdateResult(None, metrics, rejected=reason)
        self._probe_cache = after
        return UpdateResult(self.tensors(), metrics)

    @torch.no_grad()
    def restore(self, snapshot: list[torch.Tensor]) -> None:
        for p, saved in zip(self.params, snapshot):
            p.copy_(saved)
        self._probe_cache = None

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]
