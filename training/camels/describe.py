"""Describe learned CaMeLS token weights on held-out documents: how they are distributed and which
kinds of tokens get high weight (the paper reports ~80% below 1, ~20% above 200, favouring names
and numbers).

    python -m training.camels.describe --squad ../shared/data/squad/dev-v1.1.json \
        --artifact var/artifacts/camels --split val --documents 100 --out docs/results/camels-weights.json

Weights are reported raw and divided by their document mean (online fine-tuning normalises the
weighted loss by the weight sum, so only relative weights matter there).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from training.camels.weighting_model import TokenWeightingModel, load_weighting_model
from training.data import load_squad_seq
from training.models import ModelSettings, load_causal_lm
from training.qa_tuning import apply_qa_tuning

STOPWORDS = set(
    "a an the of to in on at by for with from and or but as is was were are be been being it its this that "
    "these those which who whom whose what when where why how he she they we you i his her their our your "
    "not no into than then so such also has have had do does did can could would should will may might".split()
)
KINDS = ("number", "capitalised", "stopword", "punctuation", "other")


def token_kind(piece: str) -> str:
    """Coarse kind of a token from its decoded text (a leading space marks a word start)."""
    text = piece.strip()
    if any(ch.isdigit() for ch in text):
        return "number"
    if not text or not any(ch.isalnum() for ch in text):
        return "punctuation"
    if text[0].isupper() and piece[:1].isspace():
        return "capitalised"
    if text.lower() in STOPWORDS:
        return "stopword"
    return "other"


@torch.no_grad()
def document_weights(
    model: TokenWeightingModel, tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int = 512
) -> list[tuple[str, float]]:
    """(decoded token, weight) for every token that is a training target (all but the first)."""
    ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
    device = next(model.parameters()).device
    weights = model(torch.tensor([ids], device=device))[0].tolist()
    return [(tokenizer.decode([i]), w) for i, w in zip(ids[1:], weights[1:])]


def describe(documents: list[list[tuple[str, float]]], top_n: int = 30) -> dict:
    """Distribution and per-kind figures over all tokens of ``documents``."""
    raw = torch.tensor([w for doc in documents for _, w in doc])
    relative = torch.cat([torch.tensor([w for _, w in doc]) / max(1e-12, sum(w for _, w in doc) / len(doc))
                          for doc in documents if doc])
    kinds = [token_kind(t) for doc in documents for t, _ in doc]
    threshold = torch.quantile(relative, 0.9).item()
    per_kind = {}
    for kind in KINDS:
        mask = torch.tensor([k == kind for k in kinds])
        if mask.any():
            per_kind[kind] = {
                "share_of_tokens": round(mask.float().mean().item(), 4),
                "mean_relative_weight": round(relative[mask].mean().item(), 3),
                "share_of_top10pct": round((mask & (relative >= threshold)).sum().item()
                                           / max(1, (relative >= threshold).sum().item()), 4),
            }
    pieces = [(t, w) for doc in documents for t, w in doc]
    top = sorted(range(len(pieces)), key=lambda i: -relative[i].item())[:top_n]
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    return {
        "documents": len(documents), "tokens": len(raw),
        "raw": {"mean": round(raw.mean().item(), 4), "max": round(raw.max().item(), 4),
                "share_below_1": round((raw < 1).float().mean().item(), 4),
                "quantiles": {str(q): round(torch.quantile(raw, q).item(), 4) for q in quantiles}},
        "relative": {"share_below_1": round((relative < 1).float().mean().item(), 4),
                     "share_above_3x_mean": round((relative > 3).float().mean().item(), 4),
                     "share_above_10x_mean": round((relative > 10).float().mean().item(), 4),
                     "max": round(relative.max().item(), 3),
                     "quantiles": {str(q): round(torch.quantile(relative, q).item(), 3) for q in quantiles}},
        "by_kind": per_kind,
        "top_tokens": [[pieces[i][0], round(relative[i].item(), 2)] for i in top],
    }


def _shown(piece: str) -> str:
    return re.sub(r"\s+", " ", piece).strip() or repr(piece)


def markdown(summary: dict) -> str:
    rows = ["| kind | share of tokens | mean weight / doc mean | share of top-10% |", "|---|---|---|---|"]
    for kind, s in summary["by_kind"].items():
        rows.append(f"| {kind} | {s['share_of_tokens']:.1%} | {s['mean_relative_weight']:.2f} | {s['share_of_top10pct']:.1%} |")
    rel, raw = summary["relative"], summary["raw"]
    head = (f"{summary['tokens']} tokens in {summary['documents']} documents. Raw weights: mean {raw['mean']}, "
            f"max {raw['max']}, {raw['share_below_1']:.1%} below 1. Relative to the document mean: "
            f"{rel['share_below_1']:.1%} below 1, {rel['share_above_3x_mean']:.1%} above 3x, "
            f"{rel['share_above_10x_mean']:.1%} above 10x, max {rel['max']}x.")
    top = ", ".join(f"`{_shown(t)}` {w}" for t, w in summary["top_tokens"][:15])
    return head + "\n\n" + "\n".join(rows) + "\n\nHighest-weighted tokens (x doc mean): " + top + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--squad", required=True)
    p.add_argument("--artifact", default="var/artifacts/camels")
    p.add_argument("--base-model", default="smollm2-135m-instruct")
    p.add_argument("--qa-tuning", default=None, help="qa_lora artifact merged into the base first")
    p.add_argument("--split", default="val")
    p.add_argument("--documents", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="JSON path (a .md summary is written next to it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_causal_lm(args.base_model, ModelSettings(device=args.device))
    if args.qa_tuning:
        base = apply_qa_tuning(base, Path(args.qa_tuning).expanduser())
    model = load_weighting_model(args.artifact, base)
    evalset = load_squad_seq(args.squad, args.split)
    docs = [document_weights(model, tokenizer, d.text) for d in evalset.documents[: args.documents]]
    summary = describe(docs) | {"artifact": str(args.artifact), "split": args.split}
    text = markdown(summary)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=2))
        out.with_suffix(".md").write_text(text)
    return summary


if __name__ == "__main__":
    main()
