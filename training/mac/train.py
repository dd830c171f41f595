"""MAC training recipe: end-to-end QA NLL of the frozen base model reading the memory.

Each step draws ``docs_per_step`` training paragraphs and one question about each; each question
reads its own paragraph's entry (plus ``entries_per_question - 1`` distractors, as after a top-k
retrieval). With backprop dropout only a ``backprop_fraction`` of the entries carries gradients,
the rest are amortized under ``no_grad`` (the paper's memory trick; cheap here anyway, since only
the memory tokens' positions are on the autograd tape, ``amortizer.py``). The frozen base
model scores the gold answers after the memory; the gradient reaches the learned memory tokens
through the base model's forward pass over each document. Adam with linear warmup and cosine
decay, gradient clipping, periodic validation (NLL and generated-answer F1 with the val paragraphs
in memory, read through the same top-k retrieval as at ask time) picks the best checkpoint, which
is exported as an artifact. Training state is checkpointed and resumed; ``--max-minutes`` bounds
the wall-clock budget.

    python -m training.mac.train --squad ../shared/data/squad/dev-v1.1.json --out var/artifacts/mac \
        --qa-tuning artifacts/qa-format/smollm2-135m-instruct --max-minutes 60 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.data.evalset import EvalSet
from training.mac.config import MACConfig
from training.mac.aggregator import stack_memories
from training.mac.model import MAC, answer_nll, prompt_head, qa_batch, save_mac
from training.mac.runtime import MacReadConfig, MacRuntime
from training.mac.rerotate import read_offsets, rotary_embedding, shift_entry
from training.memory import InMemoryMemoryBank, Storage, decode_entry, encode_entry
from training.mac.prefix import PromptHead
from training.eval.metrics import mean, squad_scores
from training.types import Document, Question

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Optimisation settings of a MAC run (the architecture is ``MACConfig``)."""

    steps: int = Field(1500, description="optimizer steps (the schedule length; --max-minutes may stop earlier)")
    docs_per_step: int = Field(4, description="paragraphs amortized per step (one question each)")
    backprop_fraction: float = Field(1.0, description="share of the step's documents that carry gradients")
    entries_per_question: int = Field(1, description="entries a training question reads: its own plus distractors "
                                                     "from the step (1 matches top-1 retrieval, the best on val)")
    lr: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    max_answer_tokens: int = Field(24, description="skip training questions with longer answers")
    eval_every: int = Field(100, description="steps between validations")
    val_docs: int = Field(24, description="val paragraphs in memory during validation")
    val_questions: int = Field(48, description="val questions generated and scored (F1) per validation")
    val_top_k: int = Field(1, description="entries each validation question reads (top-k by retrieval key)")
    storage: Storage = Field("float16", description="storage the entries are read from: training sees the "
                                                    "quantized entry (straight-through gradient), as a bank returns it")
    rerotate: bool = Field(False, description="each entry a question reads at its own positions (keys re-rotated, "
                                              "its own entry next to the question), as MacReadConfig.rerotate")
    val_answer_tokens: int = Field(24, description="answer tokens generated per validation question")
    checkpoint_every: int = 25
    max_minutes: float | None = None
    seed: int = 0


# --- data ----------------------------------------------------------------------------------------


def training_pairs(evalset: EvalSet) -> dict[str, list[Question]]:
    """Questions grouped by their (single) supporting document."""
    by_doc: dict[str, list[Question]] = {}
    for q in evalset.questions:
        if len(q.doc_ids) == 1 and q.answers:
            by_doc.setdefault(q.doc_ids[0], []).append(q)
    return by_doc


def validation_set(val: EvalSet, cfg: TrainConfig) -> tuple[list[Document], list[Question]]:
    """A fixed memory of ``val_docs`` paragraphs and ``val_questions`` questions about them."""
    rng = random.Random(cfg.seed + 1)
    docs = rng.sample(val.documents, min(cfg.val_docs, len(val.documents)))
    questions = val.questions_about({d.id for d in docs})
    questions = rng.sample(questions, min(cfg.val_questions, len(questions)))
    return docs, questions


# --- one step ------------------------------------------------------------------------------------


def mac_loss(
    mac: MAC,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    questions: list[str],
    answers: list[str],
    backprop_mask: list[bool],
    head: PromptHead | None = None,
    entries_per_question: int = 1,
    storage: Storage = "float16",
    rerotate: bool = False,
) -> torch.Tensor:
    """Mean answer NLL over the questions (question ``i`` is about ``texts[i]``), each reading its
    own entry and the next ``entries_per_question - 1`` ones; documents whose ``backprop_mask`` is
    False are amortized without gradients (backprop dropout). ``storage``: entries as the bank
    returns them (quantized, straight-through gradient); ``rerotate``: the read entries at their own
    positions, as ``MacRuntime`` reads them."""
    entries = []
    for text, keep in zip(texts, backprop_mask):
        with torch.set_grad_enabled(keep and torch.is_grad_enabled()):
            entry = mac.amortizer(base, tokenizer, head, text)  # no retrieval key: nothing selects
            if storage != "float16":
                stored = decode_entry(encode_entry(entry, storage)).to(entry.device, entry.dtype)
                entry = entry + (stored - entry).detach()
            entries.append(entry)
    n = min(entries_per_question, len(entries))
    reads = [[entries[(i + j) % len(entries)] for j in range(n)] for i in range(len(questions))]
    start = mac.start(head)
    if rerotate:
        rotary, span = rotary_embedding(base), mac.start(None)
        reads = [[shift_entry(e, offset, rotary) for e, offset in zip(row, read_offsets(n, span))] for row in reads]
        start += (n - 1) * span
    memory, memory_mask = stack_memories(reads, base.device)
    input_ids, mask, labels = qa_batch(tokenizer, questions, answers, device=base.device, head=head)
    return answer_nll(base, memory, input_ids, mask, labels, head=head, memory_mask=memory_mask,
                      start=start).mean()


def sample_step(
    rng: random.Random, doc_texts: dict[str, str], pairs: dict[str, list[Question]], cfg: TrainConfig
) -> tuple[list[str], list[str], list[str], list[bool]]:
    doc_ids = rng.sample(sorted(pairs), cfg.docs_per_step)
    questions = [rng.choice(pairs[d]) for d in doc_ids]
    n_grad = max(1, round(cfg.backprop_fraction * len(doc_ids)))
    mask = [i < n_grad for i in range(len(doc_ids))]
    rng.shuffle(mask)
    return ([doc_texts[d] for d in doc_ids], [q.question for q in questions],
            [q.answers[0] for q in questions], mask)


# --- validation ----------------------------------------------------------------------------------


@torch.no_grad()
def validate(
    mac: MAC,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: list[Document],
    questions: list[Question],
    top_k: int,
    batch_size: int = 8,
    head: PromptHead | None = None,
    storage: Storage = "float16",
    rerotate: bool = False,
    max_new_tokens: int = 24,
) -> dict[str, float]:
    """Generated-answer F1/EM (percent) with ``docs`` in memory, each question reading its top-k
    entries, and the memory probe: answer NLL with the question's own paragraph alone in memory
    (``nll_own``) and with another one (``nll_other``); ``nll_other - nll_own`` is what reading
    memory is worth on unseen paragraphs."""
    mac.eval()
    runtime = MacRuntime(mac, base, tokenizer, InMemoryMemoryBank(storage),
                         MacReadConfig(top_k=top_k, storage=storage, rerotate=rerotate))
    runtime.memorize([d.id for d in docs], [d.text for d in docs])  # answers read them as the service does
    memory = runtime.bank.get([d.id for d in docs])
    index = {d.id: i for i, d in enumerate(docs)}
    own, other, scores, samples = [], [], [], []
    start = mac.start(head)
    for first in range(0, len(questions), batch_size):
        batch = questions[first : first + batch_size]
        texts = [q.question for q in batch]
        tokens, mask, labels = qa_batch(tokenizer, texts, [q.answers[0] for q in batch], device=base.device, head=head)
        mine = [index[q.doc_ids[0]] for q in batch]
        for choice, out in ((mine, own), ([(m + 1) % len(memory) for m in mine], other)):
            kv, kv_mask = stack_memories([[memory[c]] for c in choice], base.device)
            out += answer_nll(base, kv, tokens, mask, labels, head=head, memory_mask=kv_mask, start=start).tolist()
        predictions = [text for text, _ in runtime.answer(base, texts, max_new_tokens=max_new_tokens)]
        scores += [squad_scores(p, q.answers) for p, q in zip(predictions, batch)]
        samples += [[q.question, p, q.answers[0]] for p, q in zip(predictions, batch)]
    mac.train()
    return {"loss": round(mean(own), 4), "nll_own": round(mean(own), 4), "nll_other": round(mean(other), 4),
            "f1": round(100 * mean(s["f1"] for s in scores), 2),
            "em": round(100 * mean(s["em"] for s in scores), 2), "n": len(scores), "samples": samples[:4]}


# --- the loop ------------------------------------------------------------------------------------


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    progress = min(1.0, step / max(1, cfg.steps))
    return warm * 0.5 * (1 + math.cos(math.pi * progress))


def train_mac(
    mac: MAC,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train: EvalSet,
    val: EvalSet,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    on_best=None,
    progress: bool = True,
    stop_at: int | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce_grads=None,
) -> dict:
    """Train in place; resumes from ``checkpoint``; calls ``on_best(mac, metrics)`` whenever the
    validation F1 (ties: lower loss) improves; ``stop_at`` pauses (checkpointed) before the end of
    the schedule. Returns the state: step, history, best validation metrics.

    Data parallel (``training.retrain.distributed``): with ``shard=(rank, world)`` every process
    draws the same global step (same seed) and computes the loss of its ``rank::world`` share;
    ``reduce_grads(params)`` averages the gradients across processes before clipping, so the
    update equals the single-process one (``docs_per_step`` must divide by ``world``). Only rank 0
    writes the checkpoint."""
    rank, world = shard
    if cfg.docs_per_step % world:
        raise ValueError(f"docs_per_step={cfg.docs_per_step} does not divide among {world} processes")
    base.requires_grad_(False)
    base.eval()
    params = [p for p in mac.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    state = {"step": 0, "history": [], "best": None, "seconds": 0.0}
    if checkpoint and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        mac.load_state_dict(saved["mac"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"]
        log.info("resuming MAC training at step %d", state["step"])

    def save_checkpoint() -> None:
        if checkpoint is None or rank != 0:
            return
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"mac": mac.trainable_tensors(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "state": state}, tmp)
        tmp.replace(checkpoint)

    doc_texts = {d.id: d.text for d in train.documents}
    pairs = {
        d: [q for q in qs if len(tokenizer(q.answers[0], add_special_tokens=False)["input_ids"]) <= cfg.max_answer_tokens]
        for d, qs in training_pairs(train).items()
    }
    pairs = {d: qs for d, qs in pairs.items() if qs and d in doc_texts}
    val_docs, val_questions = validation_set(val, cfg)
    head = prompt_head(base, tokenizer)

    def run_validation() -> None:
        metrics = {"step": state["step"], "training_minutes": round(state["seconds"] / 60, 2),
                   **validate(mac, base, tokenizer, val_docs, val_questions, cfg.val_top_k, head=head,
                              storage=cfg.storage, rerotate=cfg.rerotate, max_new_tokens=cfg.val_answer_tokens)}
        state["history"].append(metrics)
        log.info("validation %s", json.dumps(metrics))
        best = state["best"]
        if best is None or (metrics["f1"], -metrics["loss"]) > (best["f1"], -best["loss"]):
            state["best"] = metrics
            if on_best is not None:
                on_best(mac, metrics)

    if state["step"] == 0 and not state["history"]:
        run_validation()
    if cfg.max_minutes is not None and state["seconds"] > 60 * cfg.max_minutes:
        log.info("time budget of %.1f minutes already spent (step %d)", cfg.max_minutes, state["step"])
        return state
    started = time.time() - state["seconds"]
    mac.train()
    bar = tqdm(range(state["step"], cfg.steps), desc="mac", initial=state["step"], total=cfg.steps,
               disable=not progress)
    running: dict[str, float] = {}
    for step in bar:
        texts, questions, answers, mask = sample_step(rng, doc_texts, pairs, cfg)
        if world > 1:  # this process's share of the global step
            texts, questions, answers, mask = (part[rank::world] for part in (texts, questions, answers, mask))
        loss = mac_loss(mac, base, tokenizer, texts, questions, answers, mask, head=head,
                        entries_per_question=cfg.entries_per_question, storage=cfg.storage,
                        rerotate=cfg.rerotate)
        loss.backward()
        if reduce_grads is not None:
            loss = reduce_grads(params, loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = {"loss": loss.item() if not running else 0.95 * running["loss"] + 0.05 * loss.item()}
        state["step"] = step + 1
        state["seconds"] = time.time() - started
        bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()} | {"gnorm": f"{float(grad_norm):.2f}"})
        out_of_time = cfg.max_minutes is not None and state["seconds"] > 60 * cfg.max_minutes
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps or out_of_time:
            state["history"].append({"step": state["step"], "train_loss_ema": round(running["loss"], 4),
                                     "minutes": round(state["seconds"] / 60, 2)})
            run_validation()
            save_checkpoint()
        elif state["step"] % cfg.checkpoint_every == 0 or state["step"] == stop_at:
            save_checkpoint()
        if out_of_time:
            log.info("time budget of %.1f minutes reached at step %d", cfg.max_minutes, state["step"])
            break
        if state["step"] == stop_at:
            break
    return state


def load_models(
    base_model: str, encoder: str, qa_tuning: str | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base LM (with the QA-format tuning merged when given) and the MiniLM encoder of a
    MAC run, with their tokenizers (shared by the training and probe CLIs)."""
    from training.models import ModelSettings, load_causal_lm, load_encoder

    settings = ModelSettings(base_model=base_model, encoder=encoder)
    base, tokenizer = load_causal_lm(base_model, settings)
    if qa_tuning:
        from training.qa_tuning import apply_qa_tuning

        base = apply_qa_tuning(base, qa_tuning)
    return (base, tokenizer, *load_encoder(encoder, settings))


def main(argv: list[str] | None = None) -> None:
    from training.data.squad import load_squad_seq
    from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--squad", required=True, help="path to SQuAD v1.1 dev JSON (squad-seq train/val)")
    parser.add_argument("--out", required=True, help="artifact directory to write (best validation F1)")
    parser.add_argument("--checkpoint", help="training checkpoint (default: <out>.ckpt.pt beside --out)")
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--qa-tuning", help="QA-format LoRA artifact merged into the base model first")
    parser.add_argument("--warm-start", help="initialise the MAC weights from a training checkpoint (.pt) or an "
                        "artifact directory; the schedule and optimizer start fresh")
    parser.add_argument("--config", help="JSON file with TrainConfig / MACConfig overrides: {'train': {...}, 'mac': {...}}")
    parser.add_argument("--extra-train", nargs="*", default=[],
                        help="RealTimeQA folders (e.g. ../shared/data/realtimeqa/2022 ../shared/data/realtimeqa/2023) "
                             "whose evidence paragraphs and questions join the training set (never 2024: it is the test)")
    parser.add_argument("--export-last", help="also write the final weights (not the best-F1 ones) as an artifact "
                        "here; with a spent budget, this exports the checkpoint as it is")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-minutes", type=float)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = json.loads(Path(args.config).read_text()) if args.config else {}
    train_cfg = TrainConfig(**overrides.get("train", {}))
    if args.steps is not None:
        train_cfg.steps = args.steps
    if args.max_minutes is not None:
        train_cfg.max_minutes = args.max_minutes
    mac_cfg = MACConfig(**overrides.get("mac", {}))
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.parent / f"{out.name}.ckpt.pt"

    base, tokenizer, encoder, enc_tokenizer = load_models(args.base_model, args.encoder, args.qa_tuning)
    torch.manual_seed(train_cfg.seed)
    mac = MAC(mac_cfg, encoder, enc_tokenizer, base.config).to(base.device)
    mac.amortizer.init_memory_tokens(base, train_cfg.seed)
    log.info("MAC parameters: %s", mac.n_parameters())
    if args.warm_start and not checkpoint.exists():
        warm = Path(args.warm_start)
        if warm.is_dir():
            from training.artifacts import load_artifact

            _, weights = load_artifact(warm, kind="mac", base_config=base.config)
        else:
            weights = torch.load(warm, weights_only=False)["mac"]
        missing = set(mac.trainable_tensors()) - set(weights)
        if missing:
            raise ValueError(f"--warm-start {warm} lacks {sorted(missing)[:5]}")
        mac.load_state_dict(weights, strict=False)
        log.info("warm start from %s", warm)
    train = load_squad_seq(args.squad, "train")
    val = load_squad_seq(args.squad, "val")
    training_data = {"dataset": "squad-seq", "source": str(args.squad), "train_articles": len(train.meta["articles"]),
                     "qa_tuning": args.qa_tuning, "warm_start": args.warm_start}
    for folder in args.extra_train:
        from training.data.realtimeqa import load_realtimeqa

        extra = load_realtimeqa(folder)
        train = EvalSet(train.name, "train", train.documents + extra.documents, train.questions + extra.questions,
                        train.meta)
        training_data.setdefault("extra", []).append(
            {"dataset": "realtimeqa", "source": str(folder), "documents": len(extra.documents),
             "questions": len(extra.questions)})

    def export(mac_: MAC, metrics: dict, path: Path = out, step: int | None = None) -> None:
        """``metrics``: the validation of these weights (the latest one for ``--export-last``)."""
        step = metrics["step"] if step is None else step
        save_mac(path, mac_, base_model=args.base_model, base_config=base.config, encoder=args.encoder,
                 training_data=training_data, metrics={"val": metrics, "step": step, "train": train_cfg.model_dump()})
        log.info("exported %s (step %d; val F1 %.2f at step %d)", path, step, metrics["f1"], metrics["step"])

    state = train_mac(mac, base, tokenizer, train, val, train_cfg, checkpoint=checkpoint, on_best=export,
                      progress=not args.no_progress)
    if args.export_last:
        export(mac, next(h for h in reversed(state["history"]) if "f1" in h), Path(args.export_last), state["step"])
    history = out.parent / f"{out.name}.history.json"
    history.write_text(json.dumps({"best": state["best"], "history": state["history"],
                                   "parameters": mac.n_parameters()}, indent=2))
    log.info("done: best %s; history in %s", state["best"], history)


if __name__ == "__main__":
    main()
