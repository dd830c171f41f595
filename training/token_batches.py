"""Token batches for the meta-learning loops: documents to learn from, questions to be tested on.

Meta-training needs three kinds of batches: a document (next-token loss, every token counts),
a question with its answer (only the answer tokens count, asked exactly as the harness and the
service ask: ``qa_messages`` under the chat template), and unrelated text (the locality probe).
All are right-padded so positions start at 0 for every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from training.prompts import qa_messages

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids with the attention mask and the labels that count (-100 elsewhere)."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], label of position t is input_ids[t] or IGNORE_INDEX

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))

    @property
    def num_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def pad_rows(rows: list[list[int]], label_rows: list[list[int]], pad_id: int) -> TokenBatch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    return TokenBatch(ids, mask, labels)


def document_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_tokens: int = 256, add_bos: bool = False
) -> TokenBatch:
    """Documents for a next-token loss: every token after the first is a target.

    No BOS by default, exactly like online fine-tuning in the harness (``training.methods.online_ft``),
    so meta-training sees documents tokenised the way they are learned online.
    """
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_tokens - int(add_bos)]
        if add_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        rows.append(ids)
    return pad_rows(rows, [list(r) for r in rows], tokenizer.pad_token_id)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase, question: str, passages: list[str] | None = None
) -> list[int]:
    """The chat prompt that asks ``question`` (with ``passages`` as context when given)."""
    encoded = tokenizer.apply_chat_template(
        qa_messages(question, passages), add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def answer_ids(tokenizer: PreTrainedTokenizerBase, answer: str) -> list[int]:
    """Answer tokens followed by the end-of-turn token, so the model also learns to stop."""
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def qa_batch(
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    answers: list[str] | list[list[int]],
    passages: list[list[str] | None] | None = None,
    max_prompt_tokens: int = 512,
) -> TokenBatch:
    """Prompt + answer rows where only the answer tokens are labelled.

    ``answers`` are strings (gold answers) or token ids (e.g. a teacher's greedy answer).
    """
    passages = passages or [None] * len(questions)
    rows, labels = [], []
    for question, answer, ctx in zip(questions, answers, passages):
        prompt = prompt_ids(tokenizer, question, ctx)[-max_prompt_tokens:]
        target = answer_ids(tokenizer, answer) if isinstance(answer, str) else list(answer)
        rows.append(prompt + target)
        labels.append([IGNORE_INDEX] * len(prompt) + target)
    return pad_rows(rows, labels, tokenizer.pad_token_id)
