"""The retrain job's training signal, made without labels: the base model writes questions about
each document, and the QA-tuned model *prompted with the whole document* answers them (the
teacher). Training the MAC memory to make the model answer like that from the compressed entry
is sequence-level distillation of the prompted model into the memory (KV-Distill / RestoreKV's
teacher; "Can gradient descent simulate prompting?"'s prompted targets). The questions come from
the base *without* the QA-format tuning: the tuning taught the model to answer in a few words, so
asked to write questions the tuned SmolLM2-135M answered instead (1 question for 5 documents,
measured; the untuned one, with the prompt below, wrote 17 of 20 for 10 documents).

The signal is written to a JSONL file one document at a time, so an interrupted job resumes where
it stopped; under ``torchrun`` each process writes its own share.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.generation import chat_input_ids, pad_token_id
from training.pipeline import generate
from training.types import Document, Question

# the text first, the instruction last: with the instruction first SmolLM2-135M often copied the
# text instead (measured, untuned model, 10 squad-seq val / RealTimeQA 2023 documents: 17 of 20
# questions written this way; 10 of 20 with an instruction-first prompt asking for "Q:" lines; the
# earlier instruction-first prompt gave 5 of 10 on the first 5 documents, the rest copied text)
QUESTION_INSTRUCTION = (
    "{text}\n\nWrite {n} short questions about the text above, one per line. Each question must end "
    "with a question mark and be answerable with a name, number, date or short phrase copied from the text."
)
_NUMBERING = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|Q\d*[:.)]|Question\s*\d*[:.)])\s*", re.IGNORECASE)
_QUESTION_WORD = re.compile(r"^(?:who|whom|whose|what|when|where|which|why|how|in what|in which|is|are|was|were|did|"
                            r"does|do)\b", re.IGNORECASE)
MAX_QUESTION_WORDS = 40


def _cut(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens], skip_special_tokens=True)


def parse_questions(generated: str, n: int) -> list[str]:
    """The first ``n`` distinct question lines of a generation (numbering stripped); a line that
    starts like a question but lacks the question mark counts (a small model may omit it), a
    sentence does not: copied text made into a "question" is a wrong signal."""
    lines = [_NUMBERING.sub("", line).strip() for line in generated.splitlines()]
    lines = [line for line in lines if 3 <= len(line.split()) <= MAX_QUESTION_WORDS]
    questions = [line[: line.index("?") + 1] if "?" in line else line.rstrip(".") + "?"
                 for line in lines if "?" in line or _QUESTION_WORD.match(line)]
    out: list[str] = []
    for q in questions:
        if q not in out:
            out.append(q)
    return out[:n]


@torch.no_grad()
def write_questions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document, n: int,
                    max_doc_tokens: int = 384, max_new_tokens: int = 64) -> list[str]:
    """Questions ``model`` writes about ``doc`` (greedy, one generation for all ``n``)."""
    prompt = QUESTION_INSTRUCTION.format(n=n, text=_cut(tokenizer, doc.text, max_doc_tokens))
    ids = chat_input_ids(tokenizer, [{"role": "user", "content": prompt}]).to(model.device)
    pad = pad_token_id(tokenizer)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return parse_questions(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), n)


@torch.no_grad()
def teacher_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, doc: Document,
                    questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """The prompted model's answers: the whole document in the prompt (cut to the prompt budget),
    the service's own answer pipeline without memory."""
    return [text for text, *_ in generate(model, tokenizer, questions, [[doc.text]] * len(questions), max_new_tokens)]


def extend_signal(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, docs: list[Document], path: Path,
                  questions_per_doc: int, deadline: float | None = None, progress: bool = True,
                  question_tokens: int = 64, answer_tokens: int = 24, writer: PreTrainedModel | None = None) -> int:
    """Append the signal of every document of ``docs`` not yet in ``path``; stops at ``deadline``
    (``time.monotonic()``). ``writer`` writes the questions (default ``model``, the teacher).
    Returns the documents added."""
    from tqdm import tqdm

    done = set(read_signal([path]))
    todo = [d for d in docs if d.id not in done]
    added = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as out:
        for doc in tqdm(todo, desc="signal", disable=not progress):
            if deadline is not None and time.monotonic() > deadline:
                break
            questions = write_questions(writer or model, tokenizer, doc, questions_per_doc,
                                        max_new_tokens=question_tokens)
            answers = teacher_answers(model, tokenizer, doc, questions, answer_tokens) if questions else []
            pairs = [{"question": q, "answer": a} for q, a in zip(questions, answers) if a.strip()]
            out.write(json.dumps({"doc_id": doc.id, "pairs": pairs}) + "\n")
            out.flush()
            added += 1
    return added


def read_signal(paths: list[Path]) -> dict[str, list[dict]]:
    """doc id -> its question/answer pairs, from every signal file that exists."""
    out: dict[str, list[dict]] = {}
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                out[record["doc_id"]] = record["pairs"]
    return out


def questions_of(signal: dict[str, list[dict]], docs: list[Document]) -> list[Question]:
    return [Question(id=f"{d.id}#q{i}", question=p["question"], answers=(p["answer"],), doc_ids=(d.id,))
            for d in docs for i, p in enumerate(signal.get(d.id, []))]


def corrupt(questions: list[Question], how: str, seed: int = 0) -> list[Question]:
    """A deliberately broken signal, to check the gate: ``shuffle`` gives every question another
    question's answer (a derangement: no answer stays on its question); ``constant`` gives every
    question the same meaningless answer."""
    if how == "constant":
        return [Question(id=q.id, question=q.question, answers=("no comment",), doc_ids=q.doc_ids) for q in questions]
    if how != "shuffle":
        raise ValueError(f"unknown corruption {how!r}")
    if len(questions) < 2:
        return questions
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    shifted = order[1:] + order[:1]  # each position of the cycle takes the next one's answer
    answers = {order[i]: questions[shifted[i]].answers for i in range(len(order))}
    return [Question(id=q.id, question=q.question, answers=answers[i], doc_ids=q.doc_ids)
            for i, q in enumerate(questions)]
