"""What an updater setting means for ``training.updates``: ``uniform``, a CaMeLS weighting-model
artifact (token weights), or a meta-trained init artifact (variant ``lora``: the initial LoRA
tensors, and the optimizer and lr it was meta-trained for). The service's ``FRESHLM_UPDATER`` and
the harness's ``camels_ft`` / ``meta_ft`` / ``pipeline`` methods resolve it here, so both run the
same update from the same artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.artifacts import ArtifactError, config_hash, read_manifest
from training.updates import TokenWeights, UpdateConfig, model_weights, uniform_weights


@dataclass
class UpdaterSpec:
    config: UpdateConfig
    token_weights: TokenWeights
    initial: dict[str, torch.Tensor] | None = None  # the adapter's starting tensors (None: fresh, B = 0)
    info: dict[str, Any] = field(default_factory=dict)


_WEIGHTING_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def weighting_model(path: str | Path, base: PreTrainedModel) -> torch.nn.Module:
    """A CaMeLS weighting model, loaded once per process and base model (lr grids build it often)."""
    from training.camels.weighting_model import load_weighting_model

    key = (str(Path(path).expanduser().resolve()), f"{config_hash(base.config)}@{base.device}")
    if key not in _WEIGHTING_MODELS:
        _WEIGHTING_MODELS[key] = load_weighting_model(key[0], base).to(base.device).eval()
    return _WEIGHTING_MODELS[key]


def load_updater(
    spec: str | Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: UpdateConfig,
    lr: float | None = None,
) -> UpdaterSpec:
    """``uniform`` -> ``config`` with weight 1 per token; a CaMeLS artifact -> ``config`` with its
    learned weights; a meta-trained init -> its optimizer (SGD or Adam) from the init at its
    meta-trained (possibly learned) lr on its own LoRA. ``lr`` (a value chosen on val) overrides the
    lr of each of them. Artifacts for another base model are refused."""
    if lr is not None:
        config = config.model_copy(update={"lr": lr})
    if str(spec) == "uniform":
        return UpdaterSpec(config, uniform_weights(tokenizer, config.max_tokens), info={"updater": "uniform"})
    manifest = read_manifest(spec)
    info = {"updater": manifest.kind, "artifact": str(spec), "artifact_created_at": manifest.created_at.isoformat()}
    if manifest.kind == "camels_weighting_model":
        weights = model_weights(tokenizer, config.max_tokens, weighting_model(spec, base))
        return UpdaterSpec(config, weights, info=info)
    if manifest.kind == "meta_ft_init":
        from training.meta_ft.adapter import online_update, read_meta_init

        adapter, tensors = read_meta_init(spec, base.config)
        if adapter.variant != "lora":
            raise ArtifactError(f"{spec}: meta-trained variant {adapter.variant!r} updates full weight matrices; "
                                "only 'lora' variant inits drive a versioned adapter")
        meta = online_update(adapter, config, lr)
        return UpdaterSpec(meta, uniform_weights(tokenizer, meta.max_tokens), initial=tensors, info=info)
    raise ArtifactError(f"{spec} holds a {manifest.kind!r} artifact, not an updater "
                        "(expected camels_weighting_model or meta_ft_init)")
