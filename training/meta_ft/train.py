"""Meta-train the starting point of single-step updates ("Can gradient descent simulate prompting?").

    python -m training.meta_ft.train --squad ../shared/data/squad/dev-v1.1.json \
        --out var/artifacts/meta_ft --target teacher --docs-per-step 1 --max-minutes 170 --threads 1

MAML: per outer example, ``docs_per_step`` training paragraphs take ONE differentiable SGD step
(lr ``adapter.inner_lr``) on their pooled LM loss, starting from the meta-parameters; the outer
loss is, on questions about those paragraphs asked without them, either the NLL of the gold answers
(``--target gold``) or KL(teacher || updated) on the tokens of the teacher's greedy answer, the
teacher being the base model prompted with the paragraph (``--target teacher``). Adam on the
meta-parameters. Progress bar, ``<run_dir>/metrics.jsonl``, resumable ``<run_dir>/checkpoint.pt``,
the artifact in ``--out`` (kind ``meta_ft_init``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from training.data import load_squad_seq
from training.inner_loop import (
    InnerLoopConfig,
    Params,
    enable_double_backward,
    inner_update,
    kl_to_teacher,
    labelled_logprobs,
    weighted_nll,
)
from training.meta_examples import paragraph_examples
from training.meta_loop import MetaParameters, OuterLoopConfig, append_metrics, run_outer_loop
from training.meta_ft.adapter import MetaAdapterConfig, attach, inner_params, save_meta_adapter
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.qa_tuning import apply_qa_tuning
from training.recipe_args import parse_config
from training.token_batches import TokenBatch, document_batch, prompt_ids, qa_batch

log = logging.getLogger(__name__)


class MetaFTTrainConfig(BaseModel):
    """Meta-train a LoRA (or rank-1) init for one-step document updates."""

    squad: Path = Field(description="SQuAD v1.1 JSON; the train split (by article) is used")
    out: Path = Field(Path("var/artifacts/meta_ft"), description="artifact directory")
    run_dir: Path | None = Field(None, description="checkpoints + metrics (default: <out>-run)")
    base_model: str = DEFAULT_BASE_MODEL
    qa_tuning: Path | None = Field(None, description="qa_lora artifact merged into the base first")
    device: str = "auto"
    dtype: str = "float32"
    split_seed: int = 0
    adapter: MetaAdapterConfig = Field(default_factory=MetaAdapterConfig)
    target: Literal["gold", "teacher"] = "teacher"
    teacher_max_tokens: int = 16
    docs_per_step: int = Field(1, description="paragraphs pooled into the one inner step (1, 4, 16)")
    questions_per_step: int = Field(4, description="outer questions per example, over its paragraphs")
    max_doc_tokens: int = 256
    outer_lr: float = 1e-4
    examples_per_update: int = Field(2, description="outer examples accumulated per Adam step")
    max_updates: int = 100_000
    max_minutes: float = 170.0
    eval_every: int = 50
    val_examples: int = 12
    checkpoint_every: int = 10
    seed: int = 0
    threads: int | None = None

    def resolved_run_dir(self) -> Path:
        return self.run_dir or self.out.with_name(self.out.name + "-run")


@contextlib.contextmanager
def base_behaviour(model: nn.Module):
    """The base model without the meta-parameters: the teacher (PEFT adapters disabled; the
    rank-1 variant never changes the module, its deltas are functional)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


@torch.no_grad()
def teacher_targets(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, paragraphs: list[str],
    questions: list[str], max_tokens: int,
) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy answers of the base model prompted with the paragraphs, and its log-probs on them."""
    answers = []
    with base_behaviour(model):
        for question in questions:
            ids = torch.tensor([prompt_ids(tokenizer, question, paragraphs)], device=model.device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = out[0, ids.shape[1]:].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            answers.append(answer or [tokenizer.eos_token_id])
        prompted = qa_batch(tokenizer, questions, answers, [paragraphs] * len(questions)).to(model.device)
        logp = labelled_logprobs(model, {}, prompted)
    return answers, logp


def outer_batch(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, list[tuple[str, str]]]],
    config: MetaFTTrainConfig, rng: random.Random,
) -> tuple[TokenBatch, TokenBatch, torch.Tensor | None]:
    """(paragraphs to learn, questions asked without them, teacher log-probs or None for gold)."""
    paragraphs = [doc for doc, _ in examples]
    pool = [qa for _, qas in examples for qa in qas]
    chosen = rng.sample(pool, min(config.questions_per_step, len(pool)))
    questions = [q for q, _ in chosen]
    doc = document_batch(tokenizer, paragraphs, config.max_doc_tokens).to(model.device)
    if config.target == "gold":
        return doc, qa_batch(tokenizer, questions, [a for _, a in chosen]).to(model.device), None
    answers, logp = teacher_targets(model, tokenizer, paragraphs, questions, config.teacher_max_tokens)
    return doc, qa_batch(tokenizer, questions, answers).to(model.device), logp


def outer_loss(model: nn.Module, params: Params, qa: TokenBatch, teacher_logp: torch.Tensor | None) -> torch.Tensor:
    return weighted_nll(model, params, qa) if teacher_logp is None else kl_to_teacher(model, params, qa, teacher_logp)


def meta_objective(
    model: nn.Module, meta: Params, variant: str, doc: TokenBatch, qa: TokenBatch,
    teacher_logp: torch.Tensor | None, inner: InnerLoopConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss after ONE differentiable inner SGD step from the meta-parameters."""
    start = inner_params(model, meta, variant)
    updated = inner_update(model, start, doc, None, inner, create_graph=True)
    loss = outer_loss(model, updated, qa, teacher_logp)
    with torch.no_grad():
        before = outer_loss(model, start, qa, teacher_logp)
    return loss, {"outer_after": loss.item(), "outer_before": before.item()}


def evaluate(
    model: nn.Module, meta: Params, variant: str, batches: list, inner: InnerLoopConfig,
) -> dict[str, float]:
    """Mean outer loss on held-out examples: at the init, and after its one-step update."""
    sums = {"outer_before": 0.0, "outer_after": 0.0}
    for doc, qa, logp in batches:
        start = {k: v.detach().requires_grad_(True) for k, v in inner_params(model, meta, variant).items()}
        updated = inner_update(model, start, doc, None, inner, create_graph=False)
        with torch.no_grad():
            sums["outer_before"] += outer_loss(model, start, qa, logp).item()
            sums["outer_after"] += outer_loss(model, updated, qa, logp).item()
    return {k: v / max(1, len(batches)) for k, v in sums.items()}


def train(config: MetaFTTrainConfig) -> dict[str, float]:
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    torch.manual_seed(config.seed)
    settings = ModelSettings(base_model=config.base_model, device=config.device, dtype=config.dtype)
    base, tokenizer = load_causal_lm(config.base_model, settings)
    if config.qa_tuning is not None:
        base = apply_qa_tuning(base, config.qa_tuning.expanduser())
    base_config = base.config
    base.requires_grad_(False)
    model, meta = attach(enable_double_backward(base), config.adapter, seed=config.seed)
    variant = config.adapter.variant
    trainable = list(meta.values())
    optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)
    inner = InnerLoopConfig(lr=config.adapter.inner_lr, steps=1)

    train_examples = paragraph_examples(load_squad_seq(config.squad, "train", seed=config.split_seed))
    val_pool = paragraph_examples(load_squad_seq(config.squad, "val", seed=config.split_seed))
    val_rng = random.Random(1234)
    n_val = min(config.val_examples, max(1, len(val_pool) // config.docs_per_step))
    val_batches = [
        outer_batch(model, tokenizer, val_pool[i * config.docs_per_step:(i + 1) * config.docs_per_step] or val_pool[:1],
                    config, val_rng)
        for i in range(n_val)
    ]

    def example_loss(rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        picked = [train_examples[rng.randrange(len(train_examples))] for _ in range(config.docs_per_step)]
        doc, qa, logp = outer_batch(model, tokenizer, picked, config, rng)
        return meta_objective(model, meta, variant, doc, qa, logp, inner)

    def load_meta(saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in saved.items():
                meta[name].copy_(tensor)

    state = run_outer_loop(
        OuterLoopConfig(max_updates=config.max_updates, max_minutes=config.max_minutes,
                        examples_per_update=config.examples_per_update, eval_every=config.eval_every,
                        checkpoint_every=config.checkpoint_every),
        run_dir,
        MetaParameters(trainable=trainable, state_dict=lambda: {k: v.detach() for k, v in meta.items()},
                       load_state_dict=load_meta),
        optimizer, random.Random(config.seed), example_loss,
        validate=lambda _state: evaluate(model, meta, variant, val_batches, inner),
        desc=f"meta_ft ({variant})",
        postfix=lambda s: {"before": f"{s['outer_before']:.3f}", "after": f"{s['outer_after']:.3f}"})
    val_metrics = evaluate(model, meta, variant, val_batches, inner)
    append_metrics(run_dir, {"update": state["update"], "final_val": val_metrics})
    save_meta_adapter(
        config.out, model, meta, config.adapter, base_model_id=config.base_model, base_config=base_config,
        config={"training": json.loads(config.model_dump_json())},
        training_data={"dataset": "squad-seq", "split": "train", "path": str(config.squad),
                       "split_seed": config.split_seed, "paragraphs": len(train_examples),
                       "examples_seen": state["example"], "qa_tuning": str(config.qa_tuning)},
        metrics={"val": val_metrics, "updates": state["update"], "minutes": round(state["elapsed_minutes"], 1)},
    )
    log.info("saved %s after %d updates: %s", config.out, state["update"], val_metrics)
    return val_metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_config(MetaFTTrainConfig, argv))


if __name__ == "__main__":
    main()
