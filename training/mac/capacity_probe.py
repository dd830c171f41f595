"""Can the MAC pathway carry a document at all? Train a fresh network on a few paragraphs and
validate on the same paragraphs.

With so few paragraphs memorising is possible, so a gap between ``nll_own`` and ``nll_other`` (and
``recon_own`` / ``recon_other`` with a reconstruction weight) shows that entries can hold their
document and the frozen base model can read it. When the full run shows no gap on unseen
paragraphs, this separates "the pathway is broken" from "the writer does not generalise"
(docs/mac.md, fourth session).

    python -m training.mac.capacity_probe --squad ../shared/data/squad/dev-v1.1.json \
        --qa-tuning artifacts/qa-format/smollm2-135m-instruct --paragraphs 16 --steps 150 \
        --reconstruction-weight 1.0
"""

from __future__ import annotations

import argparse
import json
import logging
import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data.evalset import EvalSet
from training.mac.model import MAC
from training.mac.train import TrainConfig, load_models, train_mac


def capacity_probe(
    mac: MAC, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: EvalSet, paragraphs: int,
    cfg: TrainConfig,
) -> list[dict]:
    """Train ``mac`` on ``paragraphs`` documents of ``data`` (seeded sample) and validate on the
    same ones; returns the validation records."""
    docs = random.Random(cfg.seed).sample(data.documents, min(paragraphs, len(data.documents)))
    ids = {d.id for d in docs}
    small = EvalSet(data.name, data.split, docs, [q for q in data.questions if set(q.doc_ids) <= ids])
    cfg = cfg.model_copy(update={"val_docs": len(docs), "val_questions": len(docs)})
    state = train_mac(mac, base, tokenizer, small, small, cfg, progress=False)
    return [h for h in state["history"] if "f1" in h]


def main(argv: list[str] | None = None) -> None:
    from training.data.squad import load_squad_seq
    from training.mac.config import MACConfig
    from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squad", required=True, help="SQuAD v1.1 dev JSON (paragraphs from squad-seq train)")
    parser.add_argument("--qa-tuning", help="QA-format LoRA artifact merged into the base model first")
    parser.add_argument("--paragraphs", type=int, default=16)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--reconstruction-weight", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    base, tokenizer, encoder, enc_tokenizer = load_models(DEFAULT_BASE_MODEL, DEFAULT_ENCODER, args.qa_tuning)
    torch.manual_seed(0)
    mac = MAC(MACConfig(), encoder, enc_tokenizer, base.config)
    cfg = TrainConfig(steps=args.steps, eval_every=max(1, args.steps // 3), warmup_steps=min(20, args.steps),
                      reconstruction_weight=args.reconstruction_weight)
    keys = ("step", "nll_own", "nll_other", "prefix_doc_share", "recon_own", "recon_other", "f1")
    for record in capacity_probe(mac, base, tokenizer, load_squad_seq(args.squad, "train"), args.paragraphs, cfg):
        print(json.dumps({k: record[k] for k in keys if k in record}))


if __name__ == "__main__":
    main()
