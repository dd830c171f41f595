"""Meta-train the starting point of online updates ("Can gradient descent simulate prompting?"),
in the regime it is used in: a stream of documents, each one optimizer step, one optimizer state.

    python -m training.meta_ft.train --squad ../shared/data/squad/dev-v1.1.json \
        --out var/artifacts/meta_ft --target teacher --stream-documents 4 --max-minutes 170 --threads 1

MAML over a stream: per outer example, ``stream_documents`` training paragraphs (``docs_per_step``
of them pooled per step) are learned in sequence from the meta-parameters by the online update
(``adapter.optimizer``: SGD, or Adam with its moments in the graph, at the lr ``exp(log_lr)``; with
``--learn-lr`` the log-lr is meta-learned with the init and saved as the artifact's ``inner_lr``).
The outer loss, on questions about ALL the paragraphs asked without them, is the NLL of the gold
answers (``--target gold``) or KL(teacher || updated) on the tokens of the teacher's greedy
answer, the teacher being the base model prompted with the question's own paragraph (``--target
teacher``), plus ``c_kl`` x KL(base || updated) on an unrelated paragraph (locality). Adam on the
meta-parameters. Progress bar, ``<run_dir>/metrics.jsonl``, resumable ``<run_dir>/checkpoint.pt``,
the artifact in ``--out`` (kind ``meta_ft_init``). ``--stream-documents 1`` is the one-step setting
of the earlier runs (docs/meta_learning.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import dataclass
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
    kl_to_teacher,
    labelled_logprobs,
    stream_update,
    weighted_nll,
)
from training.meta_examples import Paragraph, held_out_streams, paragraph_examples, stream_example
from training.meta_loop import MetaParameters, OuterLoopConfig, append_metrics, run_outer_loop
from training.meta_ft.adapter import (MetaAdapterConfig, attach, inner_params, load_init, read_meta_init,
                                     save_meta_adapter)
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.qa_tuning import apply_qa_tuning
from training.recipe_args import parse_config
from training.token_batches import TokenBatch, document_batch, prompt_ids, qa_batch

log = logging.getLogger(__name__)


class MetaFTTrainConfig(BaseModel):
    """Meta-train a LoRA (or rank-1) init, and its lr, for online updates over a stream."""

    squad: Path = Field(description="SQuAD v1.1 JSON; the train split (by article) is used")
    out: Path = Field(Path("var/artifacts/meta_ft"), description="artifact directory")
    run_dir: Path | None = Field(None, description="checkpoints + metrics (default: <out>-run)")
    base_model: str = DEFAULT_BASE_MODEL
    qa_tuning: Path | None = Field(None, description="qa_lora artifact merged into the base first")
    device: str = "auto"
    dtype: str = "float32"
    split_seed: int = 0
    adapter: MetaAdapterConfig = Field(default_factory=MetaAdapterConfig)
    init: Path | None = Field(None, description="warm start from a meta_ft artifact's tensors (e.g. the one-document "
                                                "init, trained on for streams); --adapter must match its variant, "
                                                "rank and layers, and its inner_lr is where the lr starts")
    learn_lr: bool = Field(True, description="meta-learn log(inner lr) with the init (saved as adapter.inner_lr)")
    lr_outer_lr: float = Field(1e-2, description="outer Adam lr of the log-lr (it moves by about this per update)")
    target: Literal["gold", "teacher"] = "teacher"
    teacher_max_tokens: int = 16
    stream_documents: int = Field(4, ge=1, description="optimizer steps in sequence per example (k)")
    docs_per_step: int = Field(1, ge=1, description="paragraphs pooled into each step (1, 4, 16)")
    window: int | None = Field(None, ge=1, description="truncated backprop: differentiate the last N steps only")
    first_order: bool = Field(False, description="drop second-order terms (gradients at detached parameters)")
    c_kl: float = Field(0.1, ge=0, description="weight of KL(base || updated) on an unrelated paragraph")
    questions_per_doc: int = Field(2, ge=1, description="outer questions about each paragraph of an example")
    max_doc_tokens: int = 256
    outer_lr: float = 1e-4
    examples_per_update: int = Field(1, description="outer examples (streams) accumulated per Adam step")
    max_updates: int = 100_000
    max_minutes: float = 170.0
    eval_every: int = 50
    val_examples: int = 12
    checkpoint_every: int = 10
    seed: int = 0
    threads: int | None = None

    def resolved_run_dir(self) -> Path:
        return self.run_dir or self.out.with_name(self.out.name + "-run")

    def inner(self) -> InnerLoopConfig:
        return InnerLoopConfig(optimizer=self.adapter.optimizer, lr=self.adapter.inner_lr, window=self.window,
                               first_order=self.first_order)


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


@dataclass
class OuterExample:
    """One stream: its steps' document batches in order, the questions about all of them (asked
    without them), the teacher's log-probs on their answers (None: gold answers), and a locality
    probe with the base model's log-probs on it."""

    docs: list[TokenBatch]
    qa: TokenBatch
    teacher_logp: torch.Tensor | None
    probe: TokenBatch
    probe_logp: torch.Tensor


def outer_example(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, stream: list[Paragraph], probe: str,
    config: MetaFTTrainConfig,
) -> OuterExample:
    texts = [text for text, _ in stream]
    docs = [document_batch(tokenizer, texts[i : i + config.docs_per_step], config.max_doc_tokens).to(model.device)
            for i in range(0, len(texts), config.docs_per_step)]
    questions = [q for _, qas in stream for q, _ in qas]
    if config.target == "gold":
        answers, teacher_logp = [a for _, qas in stream for _, a in qas], None
    else:  # each question's teacher reads the question's own paragraph
        answers, rows = [], []
        for text, qas in stream:
            ids, logp = teacher_targets(model, tokenizer, [text], [q for q, _ in qas], config.teacher_max_tokens)
            answers += ids
            rows.append(logp)
        teacher_logp = torch.cat(rows)
    probe_batch = document_batch(tokenizer, [probe], config.max_doc_tokens).to(model.device)
    with torch.no_grad(), base_behaviour(model):
        probe_logp = labelled_logprobs(model, {}, probe_batch)
    return OuterExample(docs=docs, qa=qa_batch(tokenizer, questions, answers).to(model.device),
                        teacher_logp=teacher_logp, probe=probe_batch, probe_logp=probe_logp)


def outer_loss(model: nn.Module, params: Params, qa: TokenBatch, teacher_logp: torch.Tensor | None) -> torch.Tensor:
    return weighted_nll(model, params, qa) if teacher_logp is None else kl_to_teacher(model, params, qa, teacher_logp)


def meta_objective(
    model: nn.Module, meta: Params, variant: str, example: OuterExample, inner: InnerLoopConfig,
    log_lr: torch.Tensor, c_kl: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss after the differentiable stream update from the meta-parameters at lr ``exp(log_lr)``,
    + ``c_kl`` x KL(base || updated) on the probe."""
    start = inner_params(model, meta, variant)
    updated, _ = stream_update(model, start, example.docs, None, inner, lr=log_lr.exp(), create_graph=True)
    after = outer_loss(model, updated, example.qa, example.teacher_logp)
    kl = kl_to_teacher(model, updated, example.probe, example.probe_logp) if c_kl > 0 else after.new_zeros(())
    with torch.no_grad():
        before = outer_loss(model, start, example.qa, example.teacher_logp)
    return after + c_kl * kl, {"outer_after": after.item(), "outer_before": before.item(), "kl": kl.item(),
                               "lr": log_lr.exp().item()}


def evaluate(
    model: nn.Module, meta: Params, variant: str, examples: list[OuterExample], inner: InnerLoopConfig,
    lr: float,
) -> dict[str, float]:
    """Mean outer loss on held-out streams: at the init, and after the stream update from it (with
    the probe KL from the base model)."""
    sums = {"outer_before": 0.0, "outer_after": 0.0, "kl": 0.0}
    for example in examples:
        start = {k: v.detach().requires_grad_(True) for k, v in inner_params(model, meta, variant).items()}
        updated, _ = stream_update(model, start, example.docs, None, inner, lr=lr, create_graph=False)
        with torch.no_grad():
            sums["outer_before"] += outer_loss(model, start, example.qa, example.teacher_logp).item()
            sums["outer_after"] += outer_loss(model, updated, example.qa, example.teacher_logp).item()
            sums["kl"] += kl_to_teacher(model, updated, example.probe, example.probe_logp).item()
    return {k: v / max(1, len(examples)) for k, v in sums.items()} | {"lr": lr}


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
    warm = None
    if config.init is not None:
        saved, warm = read_meta_init(config.init, base_config)
        trained_as = saved.model_dump(exclude={"inner_lr"})
        if trained_as != config.adapter.model_dump(exclude={"inner_lr"}):
            raise ValueError(f"--init {config.init} was trained as {trained_as}: give that --adapter (any inner_lr)")
    model, meta = attach(enable_double_backward(base), config.adapter, seed=config.seed)
    if warm is not None:
        load_init(model, meta, config.adapter.variant, warm)
    variant = config.adapter.variant
    log_lr = torch.tensor(math.log(config.adapter.inner_lr), device=model.device, requires_grad=config.learn_lr)
    trainable = list(meta.values()) + ([log_lr] if config.learn_lr else [])
    groups = [{"params": list(meta.values()), "lr": config.outer_lr}]
    if config.learn_lr:
        groups.append({"params": [log_lr], "lr": config.lr_outer_lr})
    optimizer = torch.optim.Adam(groups)
    inner = config.inner()

    train_paragraphs = paragraph_examples(load_squad_seq(config.squad, "train", seed=config.split_seed))
    val_paragraphs = paragraph_examples(load_squad_seq(config.squad, "val", seed=config.split_seed))
    per_example = config.stream_documents * config.docs_per_step
    val_streams = held_out_streams(val_paragraphs, per_example, config.questions_per_doc)[: config.val_examples]
    val_batches = [outer_example(model, tokenizer, stream,
                                 val_paragraphs[((i + 1) * per_example) % len(val_paragraphs)][0], config)
                   for i, stream in enumerate(val_streams)]

    def example_loss(rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        stream = stream_example(train_paragraphs, per_example, config.questions_per_doc, rng)
        probe = train_paragraphs[rng.randrange(len(train_paragraphs))][0]
        example = outer_example(model, tokenizer, stream, probe, config)
        return meta_objective(model, meta, variant, example, inner, log_lr, config.c_kl)

    def state_dict() -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in meta.items()} | {"log_lr": log_lr.detach()}

    def load_meta(saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, tensor in saved.items():
                (log_lr if name == "log_lr" else meta[name]).copy_(tensor)

    def validate(_state: dict) -> dict[str, float]:
        return evaluate(model, meta, variant, val_batches, inner, log_lr.exp().item())

    state = run_outer_loop(
        OuterLoopConfig(max_updates=config.max_updates, max_minutes=config.max_minutes,
                        examples_per_update=config.examples_per_update, eval_every=config.eval_every,
                        checkpoint_every=config.checkpoint_every),
        run_dir, MetaParameters(trainable=trainable, state_dict=state_dict, load_state_dict=load_meta),
        optimizer, random.Random(config.seed), example_loss, validate=validate,
        desc=f"meta_ft ({variant}, {config.adapter.optimizer}, k={config.stream_documents})",
        postfix=lambda s: {"before": f"{s['outer_before']:.3f}", "after": f"{s['outer_after']:.3f}",
                           "lr": f"{s['lr']:.3g}"})
    val_metrics = validate(state)
    append_metrics(run_dir, {"update": state["update"], "final_val": val_metrics})
    learned = config.adapter.model_copy(update={"inner_lr": log_lr.exp().item()})
    save_meta_adapter(
        config.out, model, meta, learned, base_model_id=config.base_model, base_config=base_config,
        config={"training": json.loads(config.model_dump_json())},
        training_data={"dataset": "squad-seq", "split": "train", "path": str(config.squad),
                       "split_seed": config.split_seed, "paragraphs": len(train_paragraphs),
                       "examples_seen": state["example"], "qa_tuning": str(config.qa_tuning)},
        metrics={"val": val_metrics, "updates": state["update"], "minutes": round(state["elapsed_minutes"], 1),
                 "learned_lr": learned.inner_lr},
    )
    log.info("saved %s after %d updates (lr %.4g): %s", config.out, state["update"], learned.inner_lr, val_metrics)
    return val_metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_config(MetaFTTrainConfig, argv))


if __name__ == "__main__":
    main()
