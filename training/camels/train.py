"""Meta-train the CaMeLS weighting model on squad-seq train articles, in the regime it is used in.

    python -m training.camels.train --squad ../shared/data/squad/dev-v1.1.json \
        --out var/artifacts/camels --max-minutes 170 --threads 1

Per outer example: ``stream_documents`` training paragraphs are learned in sequence by the online
update the harness and the service run (``--update``: a ``training.updates.UpdateConfig``;
default Adam, one step per paragraph, on a fresh LoRA), each step on the loss weighted by the
weighting model; the outer loss is the QA NLL of the updated proxy on questions about ALL the
paragraphs (so a later step must not erase an earlier one) + ``c_kl`` x KL(base || updated) on an
unrelated paragraph. Its gradient reaches the weighting model through the unrolled steps
(``training.inner_loop.stream_update``: Adam's moments stay in the graph; ``--window`` truncates
backpropagation to the last steps, ``--first-order`` drops second-order terms). Progress bar,
metrics in ``<run_dir>/metrics.jsonl`` (with seconds per example and peak RSS), checkpoints in
``<run_dir>/checkpoint.pt`` (the run resumes from it), the artifact in ``--out``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from peft import get_peft_model
from pydantic import BaseModel, Field
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.camels.weighting_model import (
    TokenWeightingModel,
    WeightingModelConfig,
    build_weighting_model,
    load_weighting_model,
    save_weighting_model,
    saved_tensors,
)
from training.data import load_squad_seq
from training.inner_loop import (
    InnerLoopConfig,
    Params,
    enable_double_backward,
    kl_from_base,
    select_params,
    stream_update,
    weighted_nll,
)
from training.lora import LoraSpec
from training.meta_examples import Paragraph, held_out_streams, paragraph_examples, stream_example
from training.meta_loop import MetaParameters, OuterLoopConfig, append_metrics, run_outer_loop
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.proxy import truncated_causal_lm
from training.qa_tuning import apply_qa_tuning
from training.recipe_args import parse_config
from training.token_batches import TokenBatch, document_batch, qa_batch
from training.updates import UpdateConfig

log = logging.getLogger(__name__)


class CamelsTrainConfig(BaseModel):
    """Meta-train a CaMeLS token-weighting model for the online update it is used with."""

    squad: Path = Field(description="SQuAD v1.1 JSON; the train split (by article) is used")
    out: Path = Field(Path("var/artifacts/camels"), description="artifact directory")
    run_dir: Path | None = Field(None, description="checkpoints + metrics (default: <out>-run)")
    base_model: str = DEFAULT_BASE_MODEL
    qa_tuning: Path | None = Field(
        None, description="qa_lora artifact merged into the base first (evaluate on the same base)")
    device: str = "auto"
    dtype: str = "float32"
    split_seed: int = 0
    proxy_layers: int | None = Field(
        None, description="first blocks of the base model kept in the proxy (none = all 30; truncated "
                          "SmolLM2 proxies are poor LMs: QA NLL 12-27 nats vs 5, see docs)")
    update: UpdateConfig = Field(
        default_factory=lambda: UpdateConfig(optimizer="adam", lr=2.5e-3, lora=LoraSpec(rank=16, top_layers=8),
                                             max_tokens=256),
        description="the online update meta-trained through (training.updates): optimizer, lr, LoRA, steps per "
                    "document, document tokens; default: the harness's uniform_ft on squad-seq (Adam, val lr 2.5e-3, "
                    "r16) on the top 8 blocks (every block: 2.5x the time and memory, docs/meta_learning.md)")
    stream_documents: int = Field(4, ge=1, description="paragraphs learned in sequence per example (k)")
    window: int | None = Field(None, ge=1, description="truncated backprop: differentiate the last N steps only")
    first_order: bool = Field(False, description="drop second-order terms (gradients at detached parameters)")
    c_kl: float = 0.1
    normalize_weights: bool = Field(
        True, description="divide the weights by their document mean in the inner loss, as online "
                          "fine-tuning does (loss / weight sum): only which tokens matter is learned, "
                          "not a step size the harness would discard")
    outer_lr: float = Field(1e-4, description="Adam lr of the weighting model")
    weighting: WeightingModelConfig = Field(default_factory=WeightingModelConfig)
    questions_per_doc: int = Field(2, ge=1, description="outer questions about each paragraph of an example")
    examples_per_update: int = Field(1, ge=1, description="streams per outer Adam step (accumulated)")
    max_updates: int = 100_000
    max_minutes: float = Field(170.0, description="wall-clock budget; saves and stops when spent")
    eval_every: int = Field(50, description="outer updates between validation passes")
    val_docs: int = Field(16, description="val paragraphs (in streams of stream_documents)")
    checkpoint_every: int = 10
    seed: int = 0
    threads: int | None = Field(None, description="torch threads (1 on a shared CPU)")
    eval_only: bool = Field(False, description="only evaluate the artifact in --out on the val paragraphs")
    final_eval: bool = Field(True, description="evaluate before saving the artifact (false + --max-updates "
                                               "<checkpoint's update>: export a checkpoint as it is)")

    def resolved_run_dir(self) -> Path:
        return self.run_dir or self.out.with_name(self.out.name + "-run")

    def inner(self) -> InnerLoopConfig:
        return InnerLoopConfig.of_update(self.update, window=self.window, first_order=self.first_order)


# --- data -------------------------------------------------------------------------------------

Example = tuple[list[TokenBatch], TokenBatch, TokenBatch]  # documents in stream order, questions, probe


def example_batches(
    tokenizer: PreTrainedTokenizerBase, docs: list[str], qas: list[tuple[str, str]], probe: str, max_tokens: int,
) -> Example:
    """One document batch per paragraph (one step each), the questions about all of them, the probe."""
    return (
        [document_batch(tokenizer, [doc], max_tokens) for doc in docs],
        qa_batch(tokenizer, [q for q, _ in qas], [a for _, a in qas]),
        document_batch(tokenizer, [probe], max_tokens),
    )


def to_device(example: Example, device: torch.device) -> Example:
    docs, qa, probe = example
    return [d.to(device) for d in docs], qa.to(device), probe.to(device)


# --- the meta-objective -----------------------------------------------------------------------

def build_proxy(base: PreTrainedModel, config: CamelsTrainConfig) -> tuple[PreTrainedModel, Params]:
    """The proxy LM (eager attention, for second derivatives) with the online update's fresh LoRA
    (``config.update.lora``, A seeded as ``training.updates.LoraUpdater`` seeds it), and its LoRA
    parameters: where every stream of the inner loop starts."""
    proxy = enable_double_backward(truncated_causal_lm(base, config.proxy_layers))
    proxy.requires_grad_(False)
    torch.manual_seed(config.update.seed)
    proxy = get_peft_model(proxy, config.update.lora.peft_config(proxy)).eval()
    return proxy, select_params(proxy, "lora")


def mean_normalized(weights: torch.Tensor, doc: TokenBatch) -> torch.Tensor:
    """Weights divided by their mean over each document's target tokens (mean 1 per document)."""
    real = (doc.labels[:, 1:] != -100).to(weights.dtype)
    mean = (weights[:, 1:] * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)
    return weights / mean.clamp(min=1e-8)


def stream_weights(
    weighting_model: TokenWeightingModel, docs: list[TokenBatch], inner: InnerLoopConfig, normalize: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights each document's step uses (mean-normalised if ``normalize``) and the raw ones;
    documents outside the differentiated window are weighted without a graph."""
    used, raw = [], []
    for index, doc in enumerate(docs):
        with torch.set_grad_enabled(torch.is_grad_enabled() and inner.differentiated(index, len(docs))):
            weights = weighting_model(doc.input_ids, doc.attention_mask)
        raw.append(weights)
        used.append(mean_normalized(weights, doc) if normalize else weights)
    return used, raw


def camels_objective(
    proxy: PreTrainedModel, params0: Params, weighting_model: TokenWeightingModel,
    docs: list[TokenBatch], qa: TokenBatch, probe: TokenBatch, inner: InnerLoopConfig, c_kl: float,
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss = QA NLL after the weighted stream update + c_kl * KL(base || updated) on ``probe``."""
    weights, raw = stream_weights(weighting_model, docs, inner, normalize)
    updated, _ = stream_update(proxy, params0, docs, weights, inner, create_graph=True)
    qa_nll = weighted_nll(proxy, updated, qa)
    kl = kl_from_base(proxy, params0, updated, probe) if c_kl > 0 else qa_nll.new_zeros(())
    real = torch.cat([w[:, 1:][d.labels[:, 1:] != -100] for w, d in zip(raw, docs)])
    return qa_nll + c_kl * kl, {"qa_nll": qa_nll.item(), "kl": kl.item(),
                                "weight_mean": real.mean().item(), "weight_max": real.max().item()}


BASELINE_KEYS = ("qa_nll_before", "qa_nll_uniform", "kl_uniform")


def evaluate(
    proxy: PreTrainedModel, params0: Params, weighting_model: TokenWeightingModel,
    examples: list[Example], inner: InnerLoopConfig, normalize: bool = False,
    baselines: dict[str, float] | None = None,
) -> dict[str, float]:
    """Mean QA NLL on held-out streams (and probe KL of each update): before any update
    (``before``), after uniform weight-1 steps (``uniform``), after the learned-weight steps
    (``learned``) and, for unnormalised weights, after uniform steps of the same size per document
    as the learned ones (``matched``: isolates *which* tokens from *how big* a step; with
    mean-normalised weights it is the uniform update). ``baselines`` from an earlier call skip the
    numbers that do not depend on the weighting model."""
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value / max(1, len(examples))

    for docs, qa, probe in examples:
        with torch.no_grad():
            learned, _ = stream_weights(weighting_model, docs, inner, normalize)
            variants: list[tuple[str, list[torch.Tensor] | None]] = [("learned", learned)]
            if not normalize:
                variants.append(("matched", [torch.full_like(w, w[:, 1:][d.labels[:, 1:] != -100].mean().item())
                                             for w, d in zip(learned, docs)]))
            if baselines is None:
                variants.append(("uniform", None))
                add("qa_nll_before", weighted_nll(proxy, params0, qa).item())
        for name, weights in variants:
            updated, _ = stream_update(proxy, params0, docs, weights, inner, create_graph=False)
            with torch.no_grad():
                add(f"qa_nll_{name}", weighted_nll(proxy, updated, qa).item())
                add(f"kl_{name}", kl_from_base(proxy, params0, updated, probe).item())
    return dict(baselines or {}) | sums


# --- the recipe -------------------------------------------------------------------------------

def train(config: CamelsTrainConfig) -> dict[str, float]:
    if config.threads:
        torch.set_num_threads(config.threads)
    run_dir = config.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config.eval_only:
        (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    settings = ModelSettings(base_model=config.base_model, device=config.device, dtype=config.dtype)
    base, tokenizer = load_causal_lm(config.base_model, settings)
    if config.qa_tuning is not None:
        base = apply_qa_tuning(base, config.qa_tuning.expanduser())
    base_config = base.config
    proxy, params0 = build_proxy(base, config)
    if config.eval_only:
        weighting_model = load_weighting_model(config.out, base)
    else:
        weighting_model = build_weighting_model(base, config.weighting).train()
    del base
    trainable = [p for p in weighting_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)
    inner = config.inner()
    device = proxy.device

    train_set = load_squad_seq(config.squad, "train", seed=config.split_seed)
    val_set = load_squad_seq(config.squad, "val", seed=config.split_seed)
    train_paragraphs = paragraph_examples(train_set)
    val_paragraphs = paragraph_examples(val_set)[: config.val_docs]
    rng = random.Random(config.seed)

    def batches(stream: list[Paragraph], probe: str) -> Example:
        return to_device(example_batches(tokenizer, [text for text, _ in stream],
                                         [qa for _, qas in stream for qa in qas], probe, config.update.max_tokens),
                         device)

    val_streams = held_out_streams(val_paragraphs, config.stream_documents, config.questions_per_doc)
    # each stream's probe: the paragraph after it (wrapping), never one of its own
    val_batches = [batches(stream, val_paragraphs[((i + 1) * config.stream_documents) % len(val_paragraphs)][0])
                   for i, stream in enumerate(val_streams)]

    if config.eval_only:
        metrics = evaluate(proxy, params0, weighting_model.eval(), val_batches, inner, config.normalize_weights)
        (run_dir / "eval.json").write_text(json.dumps({"artifact": str(config.out), "val_docs": len(val_paragraphs),
                                                       "val": metrics}, indent=2))
        log.info("%s on %d val paragraphs: %s", config.out, len(val_paragraphs), metrics)
        return metrics

    def validate(state: dict) -> dict[str, float]:
        weighting_model.eval()
        metrics = evaluate(proxy, params0, weighting_model, val_batches, inner, config.normalize_weights,
                           state.get("baselines"))
        weighting_model.train()
        state.setdefault("baselines", {k: metrics[k] for k in BASELINE_KEYS})
        return metrics

    def example_loss(rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        stream = stream_example(train_paragraphs, config.stream_documents, config.questions_per_doc, rng)
        probe = train_paragraphs[rng.randrange(len(train_paragraphs))][0]
        return camels_objective(proxy, params0, weighting_model, *batches(stream, probe), inner, config.c_kl,
                                config.normalize_weights)

    meta = MetaParameters(trainable=trainable, state_dict=lambda: saved_tensors(weighting_model),
                          load_state_dict=lambda sd: weighting_model.load_state_dict(sd, strict=False))
    loop = OuterLoopConfig(max_updates=config.max_updates, max_minutes=config.max_minutes,
                           examples_per_update=config.examples_per_update, eval_every=config.eval_every,
                           checkpoint_every=config.checkpoint_every)
    state = run_outer_loop(
        loop, run_dir, meta, optimizer, rng, example_loss, validate, desc="camels meta-train",
        postfix=lambda s: {"qa": f"{s['qa_nll']:.3f}", "kl": f"{s['kl']:.4f}", "w": f"{s['weight_mean']:.3f}"})
    val_metrics: dict[str, float] = {}
    weighting_model.eval()
    if config.final_eval:
        val_metrics = evaluate(proxy, params0, weighting_model, val_batches, inner, config.normalize_weights,
                               state.get("baselines"))
        append_metrics(run_dir, {"update": state["update"], "final_val": val_metrics})
    save_weighting_model(
        config.out, weighting_model, base_model_id=config.base_model, base_config=base_config,
        config={"training": json.loads(config.model_dump_json()), "update": config.update.model_dump()},
        training_data={"dataset": "squad-seq", "split": "train", "path": str(config.squad),
                       "split_seed": config.split_seed, "paragraphs": len(train_paragraphs),
                       "examples_seen": state["example"]},
        metrics={"val": val_metrics, "updates": state["update"], "minutes": round(state["elapsed_minutes"], 1)},
    )
    log.info("saved %s after %d updates (%.1f min): %s", config.out, state["update"], state["elapsed_minutes"], val_metrics)
    return val_metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(parse_config(CamelsTrainConfig, argv))


if __name__ == "__main__":
    main()
