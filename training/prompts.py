"""How questions (and optional passages) are put to the model, and how answers are read back.

Shared by the evaluation harness and the service so both ask the model the same way.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You answer questions about news. Reply with the shortest exact answer: a name, number, "
    "date or short phrase copied from the context. No full sentences, no explanation."
)


def qa_messages(question: str, passages: list[str] | None = None) -> list[dict[str, str]]:
    """Chat messages for a short-answer question, with the passages as context when given."""
    if passages:
        context = "\n\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
        user = f"Context:\n{context}\n\nQuestion: {question.strip()}\nShort answer:"
    else:
        user = f"Question: {question.strip()}\nShort answer:"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_PREFIXES = re.compile(r"^((the )?(short )?answer( is)?\s*[:\-]|the answer is\b|a\s*[:\-])\s*", re.IGNORECASE)


def extract_answer(generated: str) -> str:
    """First non-empty line of the generation, without an echoed 'Answer:' label or a final period."""
    for line in generated.strip().splitlines():
        line = _PREFIXES.sub("", line.strip()).strip()
        if line:
            return line.rstrip(".").strip()
    return ""
