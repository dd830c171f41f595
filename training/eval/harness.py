"""The stream-then-ask protocol every method is measured by.

1. Ingest the documents of an ``EvalSet`` one by one, in stream order, through the method.
2. Retention (optional): the questions about the first ``k`` documents are asked right after
   document ``k`` and again after ``M`` further documents, for each ``M``; the final asking below
   adds the point ``M = N - k``.
3. Ask every question (batched generation) -> SQuAD F1 / EM; multiple-choice questions also by
   likelihood ranking of the choices -> accuracy.
4. Ask latency: a few questions asked one at a time, as a user would.

Figures: F1 / EM / accuracy in percent, ingest seconds per document, ask latency p50 / p95, peak
RSS of the method's run, and the bytes the method keeps per ingested document.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import BaseModel
from tqdm import tqdm

from training.data.evalset import EvalSet
from training.methods.protocol import Method
from training.eval.metrics import mean, percentile, squad_scores
from training.eval.resources import peak_rss_mb, reset_peak_rss
from training.precision import autocast
from training.types import Question


class ProtocolConfig(BaseModel):
    retention_k: int = 10
    retention_m: list[int] = []  # further documents after which the first k's questions are re-asked
    latency_samples: int = 20
    score_choices: bool = True
    bf16: bool = False  # answers under CPU bf16 autocast, as the service's FRESHLM_CPU_BF16 decides (ingest stays fp32)


@dataclass
class MethodRun:
    name: str
    f1: float
    em: float
    accuracy: float | None
    ingest_seconds_per_doc: float
    ask_seconds_p50: float
    ask_seconds_p95: float
    peak_rss_mb: float
    memory_bytes_per_doc: float
    retention: list[list[float]] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {
            "f1": round(self.f1, 2), "em": round(self.em, 2),
            "ingest_seconds_per_doc": round(self.ingest_seconds_per_doc, 4),
            "ask_seconds_p50": round(self.ask_seconds_p50, 4),
            "ask_seconds_p95": round(self.ask_seconds_p95, 4),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "memory_bytes_per_doc": round(self.memory_bytes_per_doc, 1),
        }
        if self.accuracy is not None:
            out["accuracy"] = round(self.accuracy, 2)
        out.update(self.extra)
        return out


def score_answers(questions: list[Question], answers: list[str]) -> tuple[float, float, list[dict]]:
    """F1 and EM in percent, and one prediction record per question."""
    records = []
    for q, a in zip(questions, answers, strict=True):
        s = squad_scores(a, q.answers)
        records.append({"id": q.id, "question": q.question, "prediction": a,
                        "answers": list(q.answers), "f1": round(s["f1"], 4), "em": s["em"]})
    return (100 * mean(r["f1"] for r in records), 100 * mean(r["em"] for r in records), records)


def _in_precision(call: Callable, bf16: bool) -> Callable:
    """``call`` under CPU bf16 autocast when ``bf16``: how the service answers (ingest stays fp32)."""
    def run(*args):
        with autocast("cpu", bf16):
            return call(*args)
    return run


def run_method(
    method: Method, evalset: EvalSet, cfg: ProtocolConfig, retention: bool = False,
    progress: bool = True,
) -> MethodRun:
    """Measure one method on one stream (the method is closed afterwards)."""
    reset_peak_rss()
    docs = evalset.documents
    k = min(cfg.retention_k, len(docs))
    early_questions = evalset.questions_about({d.id for d in docs[:k]}) if retention else []
    checkpoints = {k + m: m for m in sorted(set(cfg.retention_m)) if k + m <= len(docs)}
    curve: list[list[float]] = []
    ingest_seconds = 0.0
    answer, choice_scores = (_in_precision(call, cfg.bf16) for call in (method.answer, method.choice_scores))
    try:
        bar = tqdm(docs, desc=f"{method.name}: ingest", disable=not progress, leave=False)
        for i, doc in enumerate(bar, 1):
            started = time.perf_counter()
            method.ingest(doc)
            ingest_seconds += time.perf_counter() - started
            if early_questions and i in checkpoints and i < len(docs):
                f1, _, _ = score_answers(early_questions, answer(early_questions))
                curve.append([checkpoints[i], round(f1, 2)])
        stored = method.stored_bytes()

        latencies = []
        for q in evalset.questions[: cfg.latency_samples]:
            started = time.perf_counter()
            answer([q])
            latencies.append(time.perf_counter() - started)

        questions = evalset.questions
        answers: list[str] = []
        step = 64  # chunks only for the progress bar; the method batches inside
        for start in tqdm(range(0, len(questions), step), desc=f"{method.name}: ask",
                          disable=not progress, leave=False):
            answers += answer(questions[start : start + step])
        f1, em, records = score_answers(questions, answers)

        accuracy = None
        choice_questions = [q for q in questions if q.choices and q.answer_index is not None]
        if cfg.score_choices and choice_questions:
            by_id = {r["id"]: r for r in records}
            correct = 0
            for q in tqdm(choice_questions, desc=f"{method.name}: choices", disable=not progress,
                          leave=False):
                scores = choice_scores(q)
                chosen = max(range(len(scores)), key=scores.__getitem__)
                correct += chosen == q.answer_index
                by_id[q.id]["choice"] = chosen
            accuracy = 100 * correct / len(choice_questions)

        if early_questions:
            early_ids = {q.id for q in early_questions}
            final = mean(r["f1"] for r in records if r["id"] in early_ids)
            curve.append([len(docs) - k, round(100 * final, 2)])
    finally:
        method.close()
    extra = method.report() if hasattr(method, "report") else {}  # e.g. update steps taken / rejected
    return MethodRun(
        name=method.name, f1=f1, em=em, accuracy=accuracy,
        ingest_seconds_per_doc=ingest_seconds / max(len(docs), 1),
        ask_seconds_p50=percentile(latencies, 50), ask_seconds_p95=percentile(latencies, 95),
        peak_rss_mb=peak_rss_mb(), memory_bytes_per_doc=stored / max(len(docs), 1),
        retention=curve, predictions=records, extra=extra,
    )
