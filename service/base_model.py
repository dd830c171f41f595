"""The base model the service answers and ingests with: the configured LM, with the QA-format
adapter merged in when one is configured (the base the MAC / CaMeLS / meta_ft artifacts were
trained and evaluated on; without it the instruct model answers in whole sentences)."""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from service.core.config import Settings
from training.models import load_causal_lm
from training.qa_tuning import apply_qa_tuning


def load_base_model(settings: Settings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model, tokenizer = load_causal_lm(settings.base_model, settings.model_settings())
    if settings.qa_tuning is not None:
        model = apply_qa_tuning(model, settings.qa_tuning)
    return model, tokenizer
