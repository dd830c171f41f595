"""Evaluate methods on a document stream with the stream-then-ask protocol.

    python -m training.eval --dataset squad-seq --data ../shared/data/squad/dev-v1.1.json \
        --split test --max-documents 64 --qa-tuning artifacts/qa-format/smollm2-135m-instruct \
        --out docs/results/squad-seq-test.json

Writes the result JSON of DESIGN.md's contract, a PNG plot and the per-question predictions
(``.predictions.jsonl.gz``) next to it. The fine-tuning methods' learning rate is chosen on a
validation stream (squad-seq: the val split; RealTimeQA: ``--val-data``, an earlier year) from
``--lr-grid``. The JSON is rewritten after every method and ``--resume`` skips methods it already
holds, so an interrupted run continues where it stopped. ``--quick`` runs a tiny random model on a
few documents: a smoke test of the whole pipeline in seconds.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import get_args

import torch

from training.data import EvalSet, load_jsonl_dataset, load_news_stream, load_realtimeqa, load_squad_seq
from training.eval.harness import ProtocolConfig, run_method
from training.mac.amortizer import SlotScores
from training.mac.runtime import MacReadConfig
from training.memory import STORAGES
from training.methods import MethodConfig, MethodContext, build_method, method_info
from training.methods.builtin import BASELINES
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm, tiny_causal_lm
from training.pipeline import PipelineConfig
from training.precision import cpu_bf16_enabled
from training.qa_tuning import apply_qa_tuning
from training.retrievers import RETRIEVERS
from training.update_bank.runtime import UpdateBankConfig
from training.eval.results_plot import plot_results

log = logging.getLogger("training.eval")
DATASETS = ("squad-seq", "realtimeqa", "news-stream", "jsonl")
PREDICTIONS = ".predictions.jsonl.gz"  # every answer of a run, next to its JSON


def load_dataset(kind: str, path: str, split: str, seed: int, questions: str | None = None) -> EvalSet:
    if kind == "squad-seq":
        return load_squad_seq(path, split, seed=seed)
    if kind == "realtimeqa":
        return load_realtimeqa(path, split=split)
    if kind == "news-stream":
        return load_news_stream(path, questions, split=split)
    if kind == "jsonl":
        return load_jsonl_dataset(path, split=split)
    raise ValueError(f"unknown dataset {kind!r}: use one of {', '.join(DATASETS)}")


def validation_set(args) -> EvalSet | None:
    """The stream the learning rate is chosen on: never the evaluated split."""
    if args.dataset == "squad-seq" and args.split != "val":
        evalset = load_squad_seq(args.data, "val", seed=args.seed)
    elif args.val_data:
        evalset = load_dataset(args.dataset, args.val_data, "val", args.seed, args.questions)
    else:
        return None
    return evalset.subset(args.val_max_documents, args.val_max_questions, seed=args.seed)


def load_base(args) -> tuple:
    packed = args.cpu_packed_linears == "on"
    if args.base_model.startswith("tiny-"):
        model, tokenizer = tiny_causal_lm(args.base_model.removeprefix("tiny-"), cpu_packed_linears=packed)
    else:
        model, tokenizer = load_causal_lm(args.base_model, ModelSettings(device=args.device, cpu_packed_linears=packed))
    if args.qa_tuning and args.qa_tuning != "none":
        model = apply_qa_tuning(model, Path(args.qa_tuning).expanduser())
    return model, tokenizer


def choose_lr(name: str, ctx: MethodContext, val: EvalSet, grid: list[float], progress: bool,
              field: str = "ft_lr", bf16: bool = False) -> tuple[float, dict]:
    """The grid learning rate (``MethodConfig.<field>``) with the best validation F1 (ties: the smaller lr)."""
    scores = {}
    protocol = ProtocolConfig(latency_samples=0, score_choices=False, bf16=bf16)
    for lr in grid:
        trial = MethodContext(ctx.model, ctx.tokenizer, ctx.config.model_copy(update={field: lr}))
        run = run_method(build_method(name, trial), val, protocol, progress=progress)
        scores[lr] = round(run.f1, 2)
        log.info("%s lr=%g: val F1 %.2f", name, lr, run.f1)
    best = max(sorted(scores), key=lambda lr: scores[lr])
    return best, {str(lr): f1 for lr, f1 in scores.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--data", required=True, help="SQuAD JSON, RealTimeQA folder, articles .jsonl.gz or JSONL file")
    p.add_argument("--questions", help="news-stream: the RealTimeQA folder whose questions the articles link")
    p.add_argument("--split", default="test")
    p.add_argument("--val-data", help="validation stream for the lr grid (RealTimeQA: an earlier year)")
    p.add_argument("--max-documents", type=int)
    p.add_argument("--max-questions", type=int)
    p.add_argument("--methods", default=",".join(BASELINES))
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers more methods (repeatable)")
    p.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="built-in name, path, HF id, tiny-llama or tiny-gpt2")
    p.add_argument("--qa-tuning", default="none", help="qa_lora artifact to merge into the base model, or none")
    p.add_argument("--device", default="auto")
    p.add_argument("--cpu-bf16", choices=("auto", "on", "off"), default="auto",
                   help="answer under bf16 autocast on a CPU, as the service's FRESHLM_CPU_BF16 (auto: CPUs with AMX)")
    p.add_argument("--cpu-packed-linears", choices=("on", "off"), default="on",
                   help="fp32 linear layers on a CPU through oneDNN with packed weights, as the service's "
                        "FRESHLM_CPU_PACKED_LINEARS")
    p.add_argument("--lr-grid", default="1e-4,5e-4,2.5e-3", help="comma list; empty: use --ft-lr")
    p.add_argument("--ft-lr", type=float, default=MethodConfig().ft_lr)
    p.add_argument("--ft-lora-r", type=int, default=MethodConfig().ft_lora_r,
                   help="LoRA rank of the online update (uniform_ft, camels_ft, ...)")
    p.add_argument("--ft-lora-top-layers", type=int, default=MethodConfig().ft_lora_top_layers,
                   help="LoRA of the online update in the last N blocks only (default: every block)")
    p.add_argument("--meta-ft-lr-grid", default="",
                   help="comma list of lrs (of the init's own optimizer) for meta_ft / meta_ft_4 / meta_ft_16 / "
                        "update_bank, chosen on the validation stream like --lr-grid; empty: the init's (learned) lr")
    p.add_argument("--val-max-documents", type=int, default=20)
    p.add_argument("--val-max-questions", type=int, default=80)
    p.add_argument("--rag-k", type=int, default=MethodConfig().rag_k)
    p.add_argument("--encoder", default=MethodConfig().encoder,
                   help="sentence encoder of rag_dense / rag_hybrid and of the pipeline's dense retrieval")
    p.add_argument("--retriever", choices=RETRIEVERS, default=PipelineConfig().retriever,
                   help="retrieval of the pipeline:<strategy> / auto methods (the service's FRESHLM_RETRIEVER)")
    p.add_argument("--max-new-tokens", type=int, default=MethodConfig().max_new_tokens)
    p.add_argument("--mac-artifact", help="MAC artifact directory (methods mac, mac_rag)")
    p.add_argument("--mac-top-k", type=int, default=MacReadConfig().top_k,
                   help="MAC: memory entries each question reads, by key similarity (0: all)")
    p.add_argument("--mac-group-size", type=int, default=MacReadConfig().group_size,
                   help="MAC: memory entries read from the bank at a time")
    p.add_argument("--mac-storage", choices=STORAGES, default=MacReadConfig().storage,
                   help="MAC: how the bank stores entries (float16, int8, KIVI int4 / int2)")
    p.add_argument("--mac-doc-slots", type=int, default=MacReadConfig().doc_slots,
                   help="MAC: document slots an entry keeps per chunk (default: the artifact's own)")
    p.add_argument("--mac-slot-scores", choices=get_args(SlotScores), default=MacReadConfig().slot_scores,
                   help="MAC: how an entry's document slots are chosen (h2o heavy hitters, kvzip reconstruction)")
    p.add_argument("--mac-write-cache", help="mac_read methods: directory that keeps written entries across runs "
                                             "(a run cut short resumes without writing them again)")
    p.add_argument("--mac-rerotate", action="store_true",
                   help="MAC: each entry read gets its own positions (keys re-rotated, RoPE models)")
    p.add_argument("--mac-combine", choices=("joint", "separate"), default=MacReadConfig().combine,
                   help="MAC: the top k entries read side by side, or each alone with the most confident "
                        "answer (mean token log-prob + key cosine x the config's weight) kept")
    p.add_argument("--camels-artifact", help="CaMeLS weighting model directory (method camels_ft)")
    p.add_argument("--meta-ft-artifact", help="meta-trained init directory (methods meta_ft, meta_ft_4, meta_ft_16)")
    p.add_argument("--meta-ft-docs-per-step", type=int, default=1, help="meta_ft: documents per SGD step")
    p.add_argument("--update-bank-updater", help="update_bank: whose step each document takes (an init or CaMeLS "
                                                 "artifact, or uniform; default: the meta_ft artifact)")
    p.add_argument("--update-bank-top-k", type=int, default=UpdateBankConfig().top_k,
                   help="update_bank: documents' updates each question applies, by key similarity")
    p.add_argument("--update-bank-storage", choices=("float16", "int8"), default=UpdateBankConfig().storage,
                   help="update_bank: how the bank stores entries")
    p.add_argument("--update-bank-key", choices=("dense", "hybrid"), default=UpdateBankConfig().key,
                   help="update_bank: how a question finds its entries (MiniLM keys, or fused with BM25)")
    p.add_argument("--retention-methods", default="uniform_ft")
    p.add_argument("--retention-k", type=int, default=10)
    p.add_argument("--retention-m", default="0,10,20,40")
    p.add_argument("--latency-samples", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON path (PNG and predictions go next to it)")
    p.add_argument("--resume", action="store_true", help="keep methods already in --out")
    p.add_argument("--quick", action="store_true", help="tiny model, few documents: a smoke test")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        # Tiny models are thousands of small ops: one thread avoids synchronisation stalls.
        args.threads = args.threads or 1
        if args.base_model == DEFAULT_BASE_MODEL:
            args.base_model = "tiny-llama"
        args.max_documents = min(args.max_documents or 6, 6)
        args.max_questions = min(args.max_questions or 12, 12)
        args.val_max_documents, args.val_max_questions = 3, 6
        args.lr_grid = "1e-4,1e-3"
        args.latency_samples = min(args.latency_samples, 2)
        args.max_new_tokens = min(args.max_new_tokens, 6)
        args.retention_k = min(args.retention_k, 2)
        args.retention_m = "0,2"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for module in args.imports:
        importlib.import_module(module)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    retention_methods = {m.strip() for m in args.retention_methods.split(",") if m.strip()}
    grid = [float(x) for x in args.lr_grid.split(",") if x.strip()]
    meta_grid = [float(x) for x in args.meta_ft_lr_grid.split(",") if x.strip()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    evalset = load_dataset(args.dataset, args.data, args.split, args.seed, args.questions)
    evalset = evalset.subset(args.max_documents, args.max_questions, seed=args.seed)
    model, tokenizer = load_base(args)
    method_config = MethodConfig(base_model=args.base_model, rag_k=args.rag_k, encoder=args.encoder,
                                 pipeline=PipelineConfig(retriever=args.retriever), max_new_tokens=args.max_new_tokens, ft_lr=args.ft_lr,
                                 ft_lora_r=args.ft_lora_r, ft_lora_alpha=2 * args.ft_lora_r,
                                 ft_lora_top_layers=args.ft_lora_top_layers, mac_artifact=args.mac_artifact, mac_write_cache=args.mac_write_cache,
                                 mac=MacReadConfig(top_k=args.mac_top_k or None, group_size=args.mac_group_size,
                                                   storage=args.mac_storage, rerotate=args.mac_rerotate,
                                                   doc_slots=args.mac_doc_slots, slot_scores=args.mac_slot_scores,
                                                   combine=args.mac_combine),
                                 camels_artifact=args.camels_artifact, meta_ft_artifact=args.meta_ft_artifact,
                                 meta_ft_docs_per_step=args.meta_ft_docs_per_step,
                                 update_bank=UpdateBankConfig(updater=args.update_bank_updater,
                                                              top_k=args.update_bank_top_k,
                                                              storage=args.update_bank_storage,
                                                              key=args.update_bank_key))
    protocol = ProtocolConfig(retention_k=args.retention_k, latency_samples=args.latency_samples,
                              retention_m=[int(m) for m in args.retention_m.split(",") if m.strip()],
                              bf16=cpu_bf16_enabled(args.cpu_bf16, model.device))
    config = {
        "command": "python -m training.eval " + " ".join(sys.argv[1:] if argv is None else argv),
        "data": args.data, "seed": args.seed, "max_documents": args.max_documents,
        "max_questions": args.max_questions, "qa_tuning": args.qa_tuning,
        "methods": method_config.model_dump(), "protocol": protocol.model_dump(),
        "lr_grid": grid, "lr_selection": {},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(model.device)},
    }
    result = {"dataset": evalset.name, "split": evalset.split, "base_model": args.base_model
              + (" + QA-format tuning" if args.qa_tuning not in (None, "none") else ""),
              "n_documents": len(evalset.documents), "n_questions": len(evalset.questions),
              "config": config, "methods": {}}
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        result["methods"] = previous.get("methods", {})
        if previous.get("retention"):
            result["retention"] = previous["retention"]
        config["lr_selection"] = previous.get("config", {}).get("lr_selection", {})
    predictions_path = out.with_suffix(PREDICTIONS)
    val = None
    for name in methods:
        if name in result["methods"]:
            log.info("%s: already in %s, skipped (--resume)", name, out)
            continue
        ctx = MethodContext(model, tokenizer, method_config)
        field = method_info(name).lr_field
        values = {"ft_lr": grid, "meta_ft_lr": meta_grid}.get(field, [])
        if field and len(values) == 1:
            ctx = MethodContext(model, tokenizer, method_config.model_copy(update={field: values[0]}))
        elif field and values:
            val = val if val is not None else validation_set(args)
            if val is None:
                raise SystemExit(f"{name}: a learning-rate grid needs a validation stream (--val-data)")
            lr, scores = choose_lr(name, ctx, val, values, progress, field, protocol.bf16)
            config["lr_selection"][name] = {"chosen": lr, "val_f1": scores,
                                            "val_documents": len(val.documents),
                                            "val_questions": len(val.questions)}
            ctx = MethodContext(model, tokenizer, method_config.model_copy(update={field: lr}))
        started = time.time()
        run = run_method(build_method(name, ctx), evalset, protocol,
                         retention=name in retention_methods, progress=progress)
        result["methods"][name] = run.summary() | {"wall_seconds": round(time.time() - started, 1)}
        if run.retention:
            result.setdefault("retention", {})[name] = run.retention
        with gzip.open(predictions_path, "at") as handle:  # gzip members append
            for record in run.predictions:
                handle.write(json.dumps({"method": name} | record) + "\n")
        out.write_text(json.dumps(result, indent=2) + "\n")
        log.info("%s: %s", name, json.dumps(result["methods"][name]))
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot_results(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
