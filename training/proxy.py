"""Truncated copies of a causal LM: the first layers (+ final norm and head) of the base model.

Meta-training differentiates through an inner update, which costs several forward/backward
passes per example; on 2 CPU cores the full 30-layer SmolLM2 allows only a few hundred outer
steps in the budget. A truncated copy keeps the base model's tokenizer, embeddings and early
layers (so what is learned is about the base model's own tokens and features) at a fraction of the
cost. The same truncation gives the CaMeLS weighting model its backbone.
"""

from __future__ import annotations

import copy

from transformers import AutoModelForCausalLM, PreTrainedModel


def truncated_causal_lm(model: PreTrainedModel, num_layers: int | None) -> PreTrainedModel:
    """A new model with the first ``num_layers`` blocks of ``model`` and its embeddings, final norm
    and head, weights copied (not shared). ``None`` or the full depth returns a full copy."""
    depth = model.config.num_hidden_layers
    num_layers = depth if num_layers is None else num_layers
    if not 1 <= num_layers <= depth:
        raise ValueError(f"num_layers must be in 1..{depth}, got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds
        config.layer_types = config.layer_types[:num_layers]
    proxy = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, _unexpected = proxy.load_state_dict(model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(proxy)]
    if missing:
        raise RuntimeError(f"truncated copy is missing weights from the base model: {missing[:5]}")
    proxy.generation_config = copy.deepcopy(model.generation_config)
    return proxy.to(model.device).eval()


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())

