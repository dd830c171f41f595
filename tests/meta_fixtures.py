"""Small on-disk fixtures for the meta-training recipes: a tiny base model directory, a
SQuAD-format file with a handful of articles (the split needs at least three), and a
meta-trained-looking init artifact."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training.meta_ft.adapter import MetaAdapterConfig, attach, save_meta_adapter
from training.models import tiny_causal_lm

FACTS = [
    ("Norvale", "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
     [("How many libraries did Norvale open?", "12"), ("When did Norvale open libraries?", "2031")]),
    ("Aurora", "Scientists at the Aurora Institute reported a record harvest of 4,500 tonnes of kelp.",
     [("Who reported a record harvest?", "the Aurora Institute")]),
    ("Harbour", "The council approved the new harbour bridge on Tuesday.",
     [("Who approved the bridge?", "the council"), ("When was the bridge approved?", "Tuesday")]),
    ("Kelp", "The kelp harvest of 4,500 tonnes was sold to 3 museums in Norvale.",
     [("How many tonnes of kelp?", "4,500")]),
    ("Bridge", "On Tuesday the bridge over the harbour opened to 12 buses.",
     [("How many buses?", "12")]),
    ("Museums", "Norvale built 3 museums and 12 libraries in 2031 with the council.",
     [("How many museums?", "3")]),
]


def write_tiny_squad(path: Path) -> Path:
    data = []
    for a, (title, text, qas) in enumerate(FACTS):
        paragraphs = [{
            "context": f"{text} {t2}",
            "qas": [{"id": f"{a}-{p}-{i}", "question": q, "answers": [{"text": ans, "answer_start": 0}]}
                    for i, (q, ans) in enumerate(qas)],
        } for p, t2 in enumerate(["", "It was a Tuesday."])]
        data.append({"title": title, "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


def write_tiny_base_model(path: Path, kind: str = "llama") -> Path:
    model, tokenizer = tiny_causal_lm(kind)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_tiny_meta_init(path: Path, config: MetaAdapterConfig) -> Path:
    """An init artifact for ``tiny_causal_lm("llama")`` with random meta-parameters (B != 0: not
    the identity, as a trained init)."""
    base, _ = tiny_causal_lm("llama")
    base.requires_grad_(False)
    model, meta = attach(base, config)
    with torch.no_grad():
        for p in meta.values():
            p.normal_(0, 0.1)
    save_meta_adapter(path, model, meta, config, base_model_id="tiny", base_config=model.config)
    return path
