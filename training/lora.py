"""One LoRA-config builder for every adapter this project makes: the online updates (harness and
service), the meta-trained init, the QA-format tuning and the CaMeLS backbone.

``LoraSpec`` says rank, scale, which linear layers and which blocks; ``peft_config`` turns it into
PEFT's ``LoraConfig`` for a given model, with the target names spelled out (PEFT's "all-linear"
cannot be combined with ``layers_to_transform``). Adapters built from equal specs on equal models
have identical parameter names, so their tensors load into each other.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rank: int = Field(16, ge=1)
    alpha: float | None = Field(None, gt=0, description="LoRA scale numerator (none: 2 x rank)")
    top_layers: int | None = Field(None, ge=1, description="adapt only the last N blocks (none: all)")
    targets: list[str] | None = Field(None, description="linear module names (none: every linear layer in the blocks)")
    dropout: float = Field(0.0, ge=0, lt=1)

    def resolved(self, model: nn.Module) -> "LoraSpec":
        """The same spec with the target layers spelled out for ``model`` (what a stored version records)."""
        return self.model_copy(update={"targets": self.targets or linear_module_names(model)})

    def peft_config(self, model: nn.Module, task_type: str | None = "CAUSAL_LM") -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha or 2 * self.rank, lora_dropout=self.dropout,
                          target_modules=self.targets or linear_module_names(model),
                          layers_to_transform=top_layers(model, self.top_layers), task_type=task_type)


def linear_module_names(model: nn.Module) -> list[str]:
    """Short names of the linear layers inside the transformer blocks (PEFT's "all-linear",
    spelled out because ``layers_to_transform`` needs an explicit list)."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return sorted({
        name.rsplit(".", 1)[-1] for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not output
        and not any(part.startswith("lora_") for part in name.split("."))  # an adapter's own layers
    })


def top_layers(model: nn.Module, count: int | None) -> list[int] | None:
    """Indices of the last ``count`` blocks (``None``: all), for PEFT's ``layers_to_transform``.

    Adapting only the top blocks stops (second-order) backpropagation there, which is most of the
    cost of a meta-gradient on CPU.
    """
    depth = model.config.num_hidden_layers
    return None if count is None or count >= depth else list(range(depth - count, depth))
