"""Meta-train the CaMeLS weighting model on squad-seq train articles.

    python -m training.camels.train --squad ../shared/data/squad/dev-v1.1.json \
        --out var/artifacts/camels --max-minutes 170 --threads 1

Per outer example: the weighting model reads a training paragraph and gives each token a weight;
a proxy LM (the base model's first ``proxy_layers`` blocks + head) takes ``inner_steps``
differentiable SGD steps on the weighted LM loss of the paragraph; the outer loss is the QA NLL of
the updated proxy on questions about the paragraph + ``c_kl`` x KL(base || updated) on an
unrelated paragraph. Its gradient reaches the weighting model through the inner step. Progress
bar, metrics in ``<run_dir>/metrics.jsonl``, checkpoints in ``<run_dir>/checkpoint.pt`` (the run
resumes from it), the artifact in ``--out``.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
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
    inner_update,
    kl_from_base,
    select_params,
    weighted_nll,
)
from training.meta_examples import paragraph_examples
from training.meta_loop import MetaParameters, OuterLoopConfig, append_metrics, run_outer_loop
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.lora import top_layers
from training.proxy import truncated_causal_lm
from training.qa_tuning import apply_qa_tuning
from training.recipe_args import parse_config
from training.token_batches import TokenBatch, document_batch, qa_batch

log = logging.getLogger(__name__)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CamelsTrainConfig(BaseModel):
    """Meta-train a CaMeLS token-weighting model."""

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
    inner_params: Literal["lora", "full"] = Field("lora", description="what the inner step updates")
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = Field(default_factory=lambda: list(ALL_LINEAR))
    lora_top_layers: int | None = Field(
        8, description="LoRA only in the last N blocks (none = all): second-order backprop then "
                       "stops there, which is most of the saving on CPU")
    inner_lr: float = Field(5e-4, description="inner SGD lr (official CaMeLS: 5e-4, full params)")
    inner_steps: int = 1
    c_kl: float = 0.1
    normalize_weights: bool = Field(
        True, description="divide the weights by their document mean in the inner loss, as online "
                          "fine-tuning does (loss / weight sum): only which tokens matter is learned, "
                          "not a step size the harness would discard")
    outer_lr: float = Field(1e-4, description="Adam lr of the weighting model")
    weighting: WeightingModelConfig = Field(default_factory=WeightingModelConfig)
    questions_per_doc: int = 4
    docs_per_update: int = Field(4, description="paragraphs per outer Adam step (accumulated)")
    max_doc_tokens: int = 256
    max_updates: int = 100_000
    max_minutes: float = Field(170.0, description="wall-clock budget; saves and stops when spent")
    eval_every: int = Field(50, description="outer updates between validation passes")
    val_docs: int = 16
    checkpoint_every: int = 10
    seed: int = 0
    threads: int | None = Field(None, description="torch threads (1 on a shared CPU)")
    eval_only: bool = Field(False, description="only evaluate the artifact in --out on the val paragraphs")
    final_eval: bool = Field(True, description="evaluate before saving the artifact (false + --max-updates "
                                               "<checkpoint's update>: export a checkpoint as it is)")

    def resolved_run_dir(self) -> Path:
        return self.run_dir or self.out.with_name(self.out.name + "-run")


# --- data -------------------------------------------------------------------------------------

def example_batches(
    tokenizer: PreTrainedTokenizerBase, doc: str, qas: list[tuple[str, str]], probe: str,
    max_doc_tokens: int,
) -> tuple[TokenBatch, TokenBatch, TokenBatch]:
    return (
        document_batch(tokenizer, [doc], max_doc_tokens),
        qa_batch(tokenizer, [q for q, _ in qas], [a for _, a in qas]),
        document_batch(tokenizer, [probe], max_doc_tokens),
    )


# --- the meta-objective -----------------------------------------------------------------------

def build_proxy(base: PreTrainedModel, config: CamelsTrainConfig) -> tuple[PreTrainedModel, Params]:
    """The proxy LM (eager attention, for second derivatives) and the parameters the inner step updates."""
    proxy = enable_double_backward(truncated_causal_lm(base, config.proxy_layers))
    proxy.requires_grad_(False)
    if config.inner_params == "lora":
        proxy = get_peft_model(proxy, LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=config.lora_targets,
            lora_dropout=0.0, layers_to_transform=top_layers(proxy, config.lora_top_layers),
        )).eval()
        return proxy, select_params(proxy, "lora")
    params = select_params(proxy, "all")
    for p in params.values():
        p.requires_grad_(True)
    return proxy, params


def mean_normalized(weights: torch.Tensor, doc: TokenBatch) -> torch.Tensor:
    """Weights divided by their mean over each document's target tokens (mean 1 per document)."""
    real = (doc.labels[:, 1:] != -100).to(weights.dtype)
    mean = (weights[:, 1:] * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp(min=1)
    return weights / mean.clamp(min=1e-8)


def camels_objective(
    proxy: PreTrainedModel, params0: Params, weighting_model: TokenWeightingModel,
    doc: TokenBatch, qa: TokenBatch, probe: TokenBatch, inner: InnerLoopConfig, c_kl: float,
    normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Outer loss = QA NLL after the weighted inner update + c_kl * KL(base || updated) on ``probe``."""
    weights = weighting_model(doc.input_ids, doc.attention_mask)
    raw = weights
    if normalize:
        weights = mean_normalized(weights, doc)
    updated = inner_update(proxy, params0, doc, weights, inner, create_graph=True)
    qa_nll = weighted_nll(proxy, updated, qa)
    kl = kl_from_base(proxy, params0, updated, probe) if c_kl > 0 else qa_nll.new_zeros(())
    real = raw[:, 1:][doc.labels[:, 1:] != -100]
    return qa_nll + c_kl * kl, {"qa_nll": qa_nll.item(), "kl": kl.item(),
                                "weight_mean": real.mean().item(), "weight_max": real.max().item()}


BASELINE_KEYS = ("qa_nll_before", "qa_nll_uniform", "kl_uniform")


def evaluate(
    proxy: PreTrainedModel, params0: Params, weighting_model: TokenWeightingModel,
    batches: list[tuple[TokenBatch, TokenBatch, TokenBatch]], inner: InnerLoopConfig,
    normalize: bool = False, baselines: dict[str, float] | None = None,
) -> dict[str, float]:
    """Mean QA NLL on held-out paragraphs (and probe KL of each update): before any update
    (``before``), after a uniform weight-1 step (``uniform``), after the learned-weight step
    (``learned``) and, for unnormalised weights, after a uniform step of the same total size as the
    learned one (``matched``: isolates *which* tokens from *how big* a step; with mean-normalised
    weights it is the uniform step). ``baselines`` from an earlier call skip the numbers that do
    not depend on the weighting model."""
    sums: dict[str, float] = {}

    def add(key: str, value: float) -> None:
        sums[key] = sums.get(key, 0.0) + value / max(1, len(batches))

    for doc, qa, probe in batches:
        with torch.no_grad():
            weights = weighting_model(doc.input_ids, doc.attention_mask)
            if normalize:
                weights = mean_normalized(weights, doc)
            real = doc.labels[:, 1:] != -100
            variants: list[tuple[str, torch.Tensor | None]] = [("learned", weights)]
            if not normalize:
                variants.append(("matched", torch.full_like(weights, weights[:, 1:][real].mean().item())))
            if baselines is None:
                variants.append(("uniform", None))
                add("qa_nll_before", weighted_nll(proxy, params0, qa).item())
        for name, w in variants:
            updated = inner_update(proxy, params0, doc, w, inner, create_graph=False)
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
    inner = InnerLoopConfig(lr=config.inner_lr, steps=config.inner_steps)
    device = proxy.device

    train_set = load_squad_seq(config.squad, "train", seed=config.split_seed)
    val_set = load_squad_seq(config.squad, "val", seed=config.split_seed)
    train_examples = paragraph_examples(train_set)
    val_examples = paragraph_examples(val_set)[: config.val_docs]
    rng = random.Random(config.seed)
    val_batches = [
        tuple(b.to(device) for b in example_batches(
            tokenizer, doc, qas[: config.questions_per_doc], val_examples[(i + 1) % len(val_examples)][0],
            config.max_doc_tokens))
        for i, (doc, qas) in enumerate(val_examples)
    ]

    if config.eval_only:
        metrics = evaluate(proxy, params0, weighting_model.eval(), val_batches, inner, config.normalize_weights)
        (run_dir / "eval.json").write_text(json.dumps({"artifact": str(config.out), "val_docs": len(val_batches),
                                                       "val": metrics}, indent=2))
        log.info("%s on %d val paragraphs: %s", config.out, len(val_batches), metrics)
        return metrics

    def validate(state: dict) -> dict[str, float]:
        weighting_model.eval()
        metrics = evaluate(proxy, params0, weighting_model, val_batches, inner, config.normalize_weights,
                           state.get("baselines"))
        weighting_model.train()
        state.setdefault("baselines", {k: metrics[k] for k in BASELINE_KEYS})
        return metrics

    def example_loss(rng: random.Random) -> tuple[torch.Tensor, dict[str, float]]:
        doc, qas = train_examples[rng.randrange(len(train_examples))]
        probe = train_examples[rng.randrange(len(train_examples))][0]
        qas = rng.sample(qas, min(config.questions_per_doc, len(qas)))
        batches = [b.to(device) for b in example_batches(tokenizer, doc, qas, probe, config.max_doc_tokens)]
        return camels_objective(proxy, params0, weighting_model, *batches, inner, config.c_kl,
                                config.normalize_weights)

    meta = MetaParameters(trainable=trainable, state_dict=lambda: saved_tensors(weighting_model),
                          load_state_dict=lambda sd: weighting_model.load_state_dict(sd, strict=False))
    loop = OuterLoopConfig(max_updates=config.max_updates, max_minutes=config.max_minutes,
                           examples_per_update=config.docs_per_update, eval_every=config.eval_every,
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
        config={"training": json.loads(config.model_dump_json())},
        training_data={"dataset": "squad-seq", "split": "train", "path": str(config.squad),
                       "split_seed": config.split_seed, "paragraphs": len(train_examples),
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
