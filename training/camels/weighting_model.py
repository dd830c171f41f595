"""The CaMeLS weighting model: reads a document, outputs one non-negative weight per token.

The official model is DistilGPT2 + Linear(768,128)-GELU-Linear(128,1)-Softplus(beta=3), last layer
zero-initialised; it shares GPT-2's tokenizer with the GPT-2 base models it reweights. DistilGPT2
is not available offline here, and any model with another tokenizer would need a token alignment
between its tokens and the base model's. So the backbone is the base model's own first layers
(embeddings + ``num_layers`` blocks + final norm, copied): same tokens by construction, features
the base model itself computes, and (4 of SmolLM2's 30 layers) a size close to DistilGPT2's
transformer. The embeddings stay frozen (they are the base model's and are not saved). What the
backbone learns is a LoRA on its blocks (``backbone = "lora"``, the default): the artifact then
holds the head and the LoRA matrices, well under a megabyte, never a copy of the base model's
blocks; ``"full"`` meta-trains (and stores) the copied blocks themselves, ``"frozen"`` the head
alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
from typing import Literal

from peft import LoraConfig, inject_adapter_in_model
from pydantic import BaseModel, Field
from torch import nn
from transformers import PreTrainedModel

from training.artifacts import load_artifact, save_artifact
from training.lora import linear_module_names
from training.proxy import truncated_causal_lm

ARTIFACT_KIND = "camels_weighting_model"


class WeightingModelConfig(BaseModel):
    num_layers: int = Field(4, ge=1, description="base-model blocks in the backbone")
    head_hidden: int = Field(128, ge=1)
    softplus_beta: float = Field(3.0, gt=0)
    backbone: Literal["lora", "full", "frozen"] = Field(
        "lora", description="what of the copied blocks is meta-trained: a LoRA on them, all their weights, or nothing")
    backbone_lora_rank: int = Field(8, ge=1)


class TokenWeightingModel(nn.Module):
    """Backbone (first base-model layers) -> MLP -> Softplus: one weight >= 0 per input token.

    The last linear layer starts at zero, so every token starts with weight softplus(0) =
    ln(2)/beta, the same for all tokens: meta-training starts from (scaled) uniform fine-tuning.
    """

    def __init__(self, backbone: PreTrainedModel, config: WeightingModelConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(hidden, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 1)
        )
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)
        self.softplus = nn.Softplus(beta=config.softplus_beta)
        self.head.to(device=next(backbone.parameters()).device, dtype=next(backbone.parameters()).dtype)
        if config.backbone == "lora":
            self.backbone.requires_grad_(False)
            rank = config.backbone_lora_rank
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                               target_modules=linear_module_names(self.backbone)), self.backbone)
        elif config.backbone == "frozen":
            self.backbone.requires_grad_(False)
        self.backbone.get_input_embeddings().requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        weights = self.softplus(self.head(hidden).squeeze(-1)).float()
        return weights if attention_mask is None else weights * attention_mask


def build_weighting_model(base_model: PreTrainedModel, config: WeightingModelConfig | None = None) -> TokenWeightingModel:
    """A fresh weighting model whose backbone is a copy of ``base_model``'s first layers."""
    config = config or WeightingModelConfig()
    backbone = truncated_causal_lm(base_model, config.num_layers).base_model
    return TokenWeightingModel(backbone, config)


def saved_tensors(model: TokenWeightingModel) -> dict[str, torch.Tensor]:
    """What the artifact holds: everything meta-trained (the frozen embeddings come from the base)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_weighting_model(
    path: str | Path, model: TokenWeightingModel, *, base_model_id: str, base_config, **manifest_fields
):
    return save_artifact(
        path, kind=ARTIFACT_KIND, tensors=saved_tensors(model), base_model=base_model_id,
        base_config=base_config, config={"weighting_model": model.config.model_dump(),
                                         **manifest_fields.pop("config", {})},
        **manifest_fields,
    )


def load_weighting_model(path: str | Path, base_model: PreTrainedModel) -> TokenWeightingModel:
    """Rebuild the weighting model on ``base_model`` and load the meta-trained weights into it;
    refuses an artifact trained for another base model (``ArtifactError``)."""
    manifest, tensors = load_artifact(path, kind=ARTIFACT_KIND, base_config=base_model.config)
    config = WeightingModelConfig.model_validate(manifest.config["weighting_model"])
    model = build_weighting_model(base_model, config)
    expected = set(saved_tensors(model))
    if set(tensors) != expected:
        raise RuntimeError(f"{path}: weights do not match the weighting model "
                           f"(missing {sorted(expected - set(tensors))[:3]}, extra {sorted(set(tensors) - expected)[:3]})")
    model.load_state_dict(tensors, strict=False)
    return model.eval()
