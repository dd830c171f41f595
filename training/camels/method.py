"""``camels_ft`` in the evaluation harness: online fine-tuning with meta-learned token weights.

Exactly the online adaptation of ``uniform_ft`` (``training.updates``: one Adam step per document,
batch 1, LoRA, lr from the same validation grid); only the per-token weights differ, read from
the CaMeLS weighting model artifact (``MethodConfig.camels_artifact``, else
``$FRESHLM_CAMELS_ARTIFACT``, else ``var/artifacts/camels``).
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from training.artifacts import config_hash
from training.camels.weighting_model import TokenWeightingModel, load_weighting_model
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.methods.online_ft import OnlineFineTuning
from training.updates import model_weights

DEFAULT_ARTIFACT = Path("var/artifacts/camels")
_LOADED: dict[tuple[str, str, str], TokenWeightingModel] = {}


def camels_artifact_path(ctx: MethodContext) -> Path:
    configured = getattr(ctx.config, "camels_artifact", None) or os.environ.get("FRESHLM_CAMELS_ARTIFACT")
    return Path(configured).expanduser() if configured else DEFAULT_ARTIFACT


def cached_weighting_model(path: Path, base: PreTrainedModel) -> TokenWeightingModel:
    """Load once per process and base model (the lr grid builds the method several times)."""
    key = (str(path.resolve()), config_hash(base.config), str(base.device))
    if key not in _LOADED:
        _LOADED[key] = load_weighting_model(path, base).to(base.device).eval()
    return _LOADED[key]


@register_method("camels_ft", lr_field="ft_lr")
def camels_ft(ctx: MethodContext) -> OnlineFineTuning:
    weighting_model = cached_weighting_model(camels_artifact_path(ctx), ctx.model)
    return OnlineFineTuning(ctx, "camels_ft", model_weights(ctx.tokenizer, ctx.config.ft_max_tokens, weighting_model))
