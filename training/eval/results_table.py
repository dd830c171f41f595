"""Markdown tables from result JSONs, for docs/BENCHMARKS.md (numbers are never typed by hand).

    python -m training.eval.results_table docs/results/squad-seq-test.json docs/results/realtimeqa-2024.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("f1", "F1"), ("em", "EM"), ("accuracy", "choice acc."),
    ("ingest_seconds_per_doc", "ingest s/doc"), ("ask_seconds_p50", "ask p50 s"),
    ("ask_seconds_p95", "ask p95 s"), ("peak_rss_mb", "peak RSS MB"),
    ("memory_bytes_per_doc", "bytes kept/doc"),
]


def _fmt(key: str, value) -> str:
    if value is None:
        return "–"
    if key in ("f1", "em", "accuracy"):
        return f"{value:.1f}"
    if key.endswith("_mb") or key.endswith("_per_doc") and "seconds" not in key:
        return f"{value:,.0f}"
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def method_table(result: dict) -> str:
    cols = [(k, h) for k, h in COLUMNS if any(k in m for m in result["methods"].values())]
    lines = ["| method | " + " | ".join(h for _, h in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, figures in result["methods"].items():
        lr = result.get("config", {}).get("lr_selection", {}).get(name, {}).get("chosen")
        label = f"`{name}`" + (f" (lr {lr:g})" if lr else "")
        lines.append(f"| {label} | " + " | ".join(_fmt(k, figures.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def retention_table(result: dict) -> str:
    retention = result.get("retention") or {}
    if not retention:
        return ""
    k = result.get("config", {}).get("protocol", {}).get("retention_k")
    lines = ["| method | " + " | ".join(f"M={m}" for m, _ in next(iter(retention.values()))) + " |"]
    lines.append("|---|" + "---:|" * len(next(iter(retention.values()))))
    for name, curve in retention.items():
        lines.append(f"| `{name}` | " + " | ".join(f"{f1:.1f}" for _, f1 in curve) + " |")
    return f"F1 on the questions about the first {k} documents, after M further documents:\n\n" + "\n".join(lines)


def describe(path: Path) -> str:
    result = json.loads(path.read_text())
    head = (f"### {result['dataset']} / {result['split']} — `{path.as_posix()}`\n\n"
            f"{result['n_documents']} documents streamed, {result['n_questions']} questions; "
            f"base model: {result['base_model']}.\n\n")
    parts = [head + method_table(result)]
    if retention := retention_table(result):
        parts.append(retention)
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    for arg in argv if argv is not None else sys.argv[1:]:
        print(describe(Path(arg)))


if __name__ == "__main__":
    main()
