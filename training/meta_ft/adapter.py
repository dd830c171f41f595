"""The meta-trained starting point of online updates, in its two variants, and its artifact.

* ``lora``: a LoRA adapter is both the meta-parameters and what the online SGD step updates
  ("LoRA inner+outer" in Zhang et al.). Online, a document moves the adapter away from the init.
* ``rank1_full``: a rank-1 delta ``B @ A`` per adapted weight matrix is meta-trained; online, the
  delta is merged and a document takes a full SGD step on those weight matrices ("rank-1 outer,
  full inner"). Full inner steps cost a full-size gradient per matrix, so only the matrices of the
  top blocks are adapted on CPU.

Both are plain parameter dicts for ``training.inner_loop``; ``inner_params`` maps the
meta-parameters to the (differentiable) parameters the inner step starts from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from pydantic import BaseModel, Field, model_validator
from torch import nn
from transformers import PreTrainedModel

from training.artifacts import load_artifact, save_artifact
from training.inner_loop import Params, select_params
from training.lora import LoraSpec, linear_module_names, top_layers
from training.updates import UpdateConfig

ARTIFACT_KIND = "meta_ft_init"
Variant = Literal["lora", "rank1_full"]


class MetaAdapterConfig(BaseModel):
    variant: Variant = "lora"
    optimizer: Literal["sgd", "adam"] = Field(
        "sgd", description="the online optimizer the init is meta-trained for (a fresh one per stream)")
    rank: int = Field(8, ge=1, description="LoRA rank (variant lora); rank1_full uses 1")
    alpha: float = 16.0
    top_layers: int | None = Field(8, description="adapt only the last N blocks (none = all)")
    targets: list[str] | None = Field(None, description="linear module names (none = all in the blocks)")
    inner_lr: float | None = Field(
        None, description="online lr the init is meta-trained for; learned with it when the recipe learns the lr "
                          "(none: 1.0 for lora, 1e-2 for rank1_full; the paper's 1e-3 barely moves a LoRA that "
                          "starts at B = 0, see docs)")

    @model_validator(mode="after")
    def _default_inner_lr(self) -> "MetaAdapterConfig":
        if self.inner_lr is None:
            self.inner_lr = 1.0 if self.variant == "lora" else 1e-2
        return self


def attach(model: PreTrainedModel, config: MetaAdapterConfig, seed: int = 0) -> tuple[nn.Module, Params]:
    """Prepare ``model`` for the variant; return the model to run and the meta-parameters.

    ``lora`` wraps the model with PEFT (B = 0, so it starts as the base model); ``rank1_full``
    leaves the model as it is and creates small random ``A`` and zero ``B`` per adapted matrix.
    """
    targets = config.targets or linear_module_names(model)
    layers = top_layers(model, config.top_layers)
    torch.manual_seed(seed)
    if config.variant == "lora":
        peft = get_peft_model(model, LoraConfig(
            r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
            layers_to_transform=layers)).eval()
        return peft, select_params(peft, "lora")
    meta: Params = {}
    for name, weight in adapted_weights(model, targets, layers).items():
        out_features, in_features = weight.shape
        meta[f"{name}::A"] = (torch.randn(1, in_features, dtype=weight.dtype, device=weight.device)
                              / in_features ** 0.5).requires_grad_(True)
        meta[f"{name}::B"] = torch.zeros(out_features, 1, dtype=weight.dtype, device=weight.device,
                                         requires_grad=True)
    return model, meta


def adapted_weights(model: nn.Module, targets: list[str], layers: list[int] | None) -> dict[str, torch.Tensor]:
    """``name -> weight`` of the linear layers named in ``targets`` inside the chosen blocks."""
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name.split(".")[-1] not in targets:
            continue
        index = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if index is None or (layers is not None and index not in layers):
            continue
        chosen[f"{name}.weight"] = module.weight
    return chosen


def inner_params(model: nn.Module, meta: Params, variant: Variant) -> Params:
    """The parameters the inner SGD step updates, as differentiable functions of ``meta``."""
    if variant == "lora":
        return meta
    named = dict(model.named_parameters())
    out = {}
    for key in meta:
        if key.endswith("::A"):
            name = key[: -len("::A")]
            out[name] = named[name].detach() + meta[f"{name}::B"] @ meta[key]
    return out


def save_meta_adapter(
    path: str | Path, model: nn.Module, meta: Params, adapter: MetaAdapterConfig, *,
    base_model_id: str, base_config, **manifest_fields,
):
    tensors = get_peft_model_state_dict(model) if adapter.variant == "lora" else dict(meta)
    return save_artifact(
        path, kind=ARTIFACT_KIND, tensors={k: v.detach() for k, v in tensors.items()},
        base_model=base_model_id, base_config=base_config,
        config={"adapter": adapter.model_dump(), **manifest_fields.pop("config", {})}, **manifest_fields,
    )


def lora_spec(config: MetaAdapterConfig) -> LoraSpec:
    """The LoRA of a ``lora``-variant init, as every other adapter of this project is built."""
    return LoraSpec(rank=config.rank, alpha=config.alpha, top_layers=config.top_layers, targets=config.targets)


def online_update(config: MetaAdapterConfig, update: UpdateConfig, lr: float | None = None) -> UpdateConfig:
    """The online update an init was meta-trained for: its optimizer at its lr (``lr`` overrides it)
    on its own LoRA; the rest (document tokens, guard) from ``update``."""
    return update.model_copy(update={"optimizer": config.optimizer, "lr": config.inner_lr if lr is None else lr,
                                     "lora": lora_spec(config)})


def read_meta_init(path: str | Path, base_config) -> tuple[MetaAdapterConfig, dict[str, torch.Tensor]]:
    """The init's config and tensors; refuses an artifact trained for another base model."""
    manifest, tensors = load_artifact(path, kind=ARTIFACT_KIND, base_config=base_config)
    return MetaAdapterConfig.model_validate(manifest.config["adapter"]), tensors


def load_init(model: nn.Module, meta: Params, variant: Variant, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a saved init's tensors into the meta-parameters ``attach`` made (in place): to warm-start
    meta-training, or to answer with it (``lora``)."""
    if variant == "lora":
        dtype = next(iter(meta.values())).dtype
        result = set_peft_model_state_dict(model, {k: v.to(dtype) for k, v in tensors.items()})
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"adapter tensors do not fit the model: {result.unexpected_keys[:3]}")
        return
    if set(tensors) != set(meta):
        raise ValueError("init tensors do not fit the adapter")
    with torch.no_grad():
        for name, tensor in tensors.items():
            meta[name].copy_(tensor.to(meta[name].dtype))


def load_meta_adapter(path: str | Path, model: PreTrainedModel) -> tuple[nn.Module, Params, MetaAdapterConfig]:
    """Attach a saved init to ``model``: returns (model to run, the online parameters, config).

    ``lora``: the PEFT-wrapped model with the meta-trained adapter, parameters = the LoRA matrices.
    ``rank1_full``: the model with the rank-1 deltas merged in place, parameters = the adapted
    weight matrices (full SGD steps on them online).
    """
    config, tensors = read_meta_init(path, model.config)
    if config.variant == "lora":
        peft, params = attach(model, config)
        load_init(peft, params, config.variant, tensors)
        return peft, params, config
    model.requires_grad_(False)
    named = dict(model.named_parameters())
    params = {}
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith("::A"):
                name = key[: -len("::A")]
                weight = named[name]
                weight += (tensors[f"{name}::B"] @ a).to(weight.dtype).to(weight.device)
                params[name] = weight.requires_grad_(True)
    return model, params, config
