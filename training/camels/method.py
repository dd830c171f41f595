"""``camels_ft`` in the evaluation harness: online fine-tuning with meta-learned token weights.

Exactly the online adaptation of ``uniform_ft`` (``training.updates``: one Adam step per document,
batch 1, LoRA, lr from the same validation grid); only the per-token weights differ, read from
the CaMeLS weighting model artifact (``MethodConfig.camels_artifact``, else
``$FRESHLM_CAMELS_ARTIFACT``, else the shipped artifact for the base model). The service's
``FRESHLM_UPDATER=<the artifact>`` resolves it the same way (``training.updaters``).
"""

from __future__ import annotations

from training.artifacts import configured_artifact
from training.methods.online_ft import OnlineFineTuning, update_config
from training.methods.protocol import MethodContext
from training.methods.registry import register_method
from training.updaters import load_updater


@register_method("camels_ft", lr_field="ft_lr")
def camels_ft(ctx: MethodContext) -> OnlineFineTuning:
    path = configured_artifact("camels", ctx.config.camels_artifact, "FRESHLM_CAMELS_ARTIFACT", ctx.config.base_model)
    spec = load_updater(path, ctx.model, ctx.tokenizer, update_config(ctx.config))
    return OnlineFineTuning(ctx, "camels_ft", spec.token_weights, spec.config)
