"""The retrain gate: the new artifact is registered only if it is not worse than the current one on
both evaluation sets: the held-out slice of the ingested documents (the teacher's answers as
reference: agreement with the prompted model) and the labelled canary set that ships in
``training/data/canary.jsonl``. "Worse" = generated-answer F1 lower by more than ``f1_tolerance``
points, or the reference answers' NLL (own document in memory) higher by more than
``nll_tolerance`` nats."""

from __future__ import annotations

from pydantic import BaseModel, Field

SETS = ("held_out", "canary")


class GateConfig(BaseModel):
    f1_tolerance: float = Field(0.5, ge=0, description="F1 points the new artifact may lose on a set")
    nll_tolerance: float = Field(0.02, ge=0, description="nats of reference-answer NLL it may gain on a set")


def figures(metrics: dict) -> dict:
    """The gate's figures of one evaluation (``training.mac.train.validate``'s output)."""
    return {"f1": metrics["f1"], "em": metrics["em"], "nll": metrics["nll_own"],
            "nll_other_document": metrics["nll_other"], "n": metrics["n"]}


def decide(current: dict[str, dict], new: dict[str, dict], cfg: GateConfig) -> tuple[bool, list[str]]:
    """(accepted, reasons it was rejected) from each set's figures of both artifacts."""
    reasons = []
    for name in SETS:
        cur, cand = current[name], new[name]
        if cand["f1"] < cur["f1"] - cfg.f1_tolerance:
            reasons.append(f"{name}: F1 {cand['f1']:.2f} < current {cur['f1']:.2f} - {cfg.f1_tolerance}")
        if cand["nll"] > cur["nll"] + cfg.nll_tolerance:
            reasons.append(f"{name}: answer NLL {cand['nll']:.4f} > current {cur['nll']:.4f} + {cfg.nll_tolerance}")
    return not reasons, reasons
