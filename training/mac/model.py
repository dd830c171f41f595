"""MAC as one module: the amortizer's learned memory tokens plus a retrieval encoder, and the
artifact format.

``MAC`` holds no base model: the frozen base LM is passed in where it is used, so one base model
can serve MAC, adapters and plain generation at once, and the artifact stays small (the memory
tokens; the encoder is named in the manifest).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from training.artifacts import Manifest, load_artifact, read_manifest, save_artifact
from training.mac.amortizer import SEGMENT_OVERHEAD, Amortizer, SlotScores
from training.mac.config import MACConfig
from training.mac.prefix import PrefixKV, PromptHead, encode_head, prefixed_forward
from training.models import ModelSettings, embed_texts, load_encoder
from training.token_batches import pad_rows, prompt_ids

ARTIFACT_KIND = "mac"


class MAC(nn.Module):
    def __init__(
        self,
        config: MACConfig,
        encoder: PreTrainedModel,
        encoder_tokenizer: PreTrainedTokenizerBase,
        base_config: PretrainedConfig,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder.requires_grad_(False).eval()
        self.encoder_tokenizer = encoder_tokenizer
        self.amortizer = Amortizer(config, base_config.get_text_config(decoder=True).hidden_size)

    @property
    def device(self) -> torch.device:
        return self.amortizer.memory_tokens.device

    def train(self, mode: bool = True) -> "MAC":
        """The frozen encoder stays in eval mode (no dropout noise in retrieval keys)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def keys(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised retrieval keys ``[B, dim]`` (documents and questions alike)."""
        return embed_texts(self.encoder, self.encoder_tokenizer, texts, self.config.key_tokens)

    def memorize(
        self, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, head: PromptHead | None, texts: list[str],
        doc_slots: int | None = None, slot_scores: SlotScores = "h2o",
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Memory entries ``(slots [layers, 2, kv_heads, n, head_dim], key [dim])`` of documents,
        one base-model forward pass per chunk, no gradient step (``doc_slots``, ``slot_scores``: see
        ``Amortizer``)."""
        keys = self.keys(texts)
        return [(self.amortizer(base, tokenizer, head, text, doc_slots, slot_scores), key)
                for text, key in zip(texts, keys)]

    def start(self, head: PromptHead | None) -> int:
        """Position of a question's first token: after the head and any chunk's slots."""
        return (len(head) if head is not None else 0) + self.config.chunk_tokens + SEGMENT_OVERHEAD \
            + self.config.memory_tokens

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """What an artifact stores: every trainable parameter (not the frozen encoder)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def n_parameters(self) -> dict[str, int]:
        return {"memory_tokens": self.amortizer.memory_tokens.numel(),
                "encoder_total": sum(p.numel() for p in self.encoder.parameters())}


# --- QA sequences after a memory -------------------------------------------------------------


def shared_head_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens every QA prompt starts with (template + system prompt), found as the common
    token prefix of very different prompts, with and without passages."""
    prompts = [prompt_ids(tokenizer, "Who?"), prompt_ids(tokenizer, "1990 zebra, 7"),
               prompt_ids(tokenizer, "Who?", ["Some context."])]
    length = 0
    while all(len(p) > length for p in prompts) and len({p[length] for p in prompts}) == 1:
        length += 1
    return prompts[0][:length]


def prompt_head(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PromptHead | None:
    """The shared prompt head's key/values for this base model (compute once, reuse)."""
    return encode_head(base, shared_head_ids(tokenizer))


def strip_head(ids: list[int], head: PromptHead | None) -> list[int]:
    if head is None:
        return ids
    if tuple(ids[: len(head)]) != head.ids:
        raise ValueError("prompt does not start with the cached prompt head (another chat template?)")
    return ids[len(head) :]


def qa_batch(
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    answers: Sequence[str],
    passages: Sequence[list[str] | None] | None = None,
    device: torch.device | str = "cpu",
    head: PromptHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 except on the answer
    and its end-of-turn token) for the shared chat QA format, without the cached ``head``."""
    passages = passages or [None] * len(questions)
    rows = []
    for q, a, p in zip(questions, answers, passages):
        prompt = strip_head(prompt_ids(tokenizer, q, p), head)
        answer = tokenizer(a.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt + answer, [-100] * len(prompt) + answer))
    batch = pad_rows([ids for ids, _ in rows], [lab for _, lab in rows], tokenizer.pad_token_id).to(device)
    return batch.input_ids, batch.attention_mask, batch.labels


def answer_nll(
    base: PreTrainedModel,
    memory: PrefixKV | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    head: PromptHead | None = None,
    memory_mask: torch.Tensor | None = None,
    start: int | None = None,
) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens after ``[head, memory]`` (per question ``[B]``).

    Only positions that predict an answer token go through the LM head (``logits_to_keep``): with
    a 49k vocabulary the head would otherwise cost ~15% of the step for logits nobody reads."""
    targets = labels[:, 1:]
    keep = (targets != -100).any(0).nonzero().flatten()
    logits = prefixed_forward(base, input_ids, attention_mask, memory, memory_mask, head=head, start=start,
                              logits_to_keep=keep).logits.float()
    targets = targets[:, keep]
    nll = nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    counts = (targets != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counts


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    stop = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        stop.add(im_end)
    return stop


# --- artifacts ---------------------------------------------------------------------------------


def save_mac(
    path: str | Path,
    mac: MAC,
    *,
    base_model: str,
    base_config: PretrainedConfig,
    encoder: str,
    training_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    return save_artifact(
        path, kind=ARTIFACT_KIND, tensors=mac.trainable_tensors(), base_model=base_model,
        base_config=base_config, config={"mac": mac.config.model_dump(), "encoder": encoder},
        training_data=training_data, metrics=metrics,
    )


def load_mac(
    path: str | Path,
    base_config: PretrainedConfig,
    encoder: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    settings: ModelSettings | None = None,
) -> tuple[MAC, Manifest]:
    """Rebuild a MAC network from an artifact; refuses one trained for another base model.
    The encoder named in the manifest is loaded unless one is passed (tests, shared instances)."""
    manifest, tensors = load_artifact(path, kind=ARTIFACT_KIND, base_config=base_config)
    config = MACConfig.model_validate(manifest.config["mac"])
    enc_model, enc_tokenizer = encoder or load_encoder(manifest.config["encoder"], settings)
    mac = MAC(config, enc_model, enc_tokenizer, base_config)
    expected = set(mac.trainable_tensors())
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"{path}: MAC weights do not match the architecture (missing {missing[:5]}, unexpected {extra[:5]})")
    mac.load_state_dict(tensors, strict=False)
    return mac.to(enc_model.device).eval(), manifest


__all__ = ["MAC", "MACConfig", "answer_nll", "load_mac", "prompt_head", "qa_batch", "read_manifest", "save_mac"]
