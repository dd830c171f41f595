"""``freshlm retrain`` / ``python -m training.retrain``: retrain the MAC artifact from the documents
the service ingested, without labels, and register it only if it is not worse.

1. documents: the service's database, read-only (``--database-url``, default
   ``$FRESHLM_DATABASE_URL``), or a JSONL export (``--jsonl``); a stable slice (by id hash) is
   held out;
2. signal: the base model (without the QA-format tuning) writes questions about each document,
   the QA-tuned model prompted with the whole document answers them (``signal``), saved in
   ``--work-dir`` as it goes (resumable);
3. training: ``training.mac.train.train_mac`` from the current artifact's weights on the signal of
   the training documents (checkpointed in ``--work-dir``: a second run resumes), data parallel
   under ``torchrun``;
4. gate: current vs new on the held-out documents (F1 against the teacher, answer NLL) and on the
   labelled canary set; the report (figures, decision, reasons) goes to ``<work-dir>/report.json``;
5. only if not worse on both: the artifact goes to the content-addressed store (``--store``) and
   the registry (``--registry-url``, default the database URL), with the figures in its manifest
   and its parent; ``--activate`` makes it active (the service's worker switches to it).

Exit status: 0 registered (or written with ``--out`` only), 3 rejected by the gate, 2 bad input.

    torchrun --nproc-per-node 2 -m training.retrain --jsonl export.jsonl --out var/retrained --max-minutes 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from training import artifact_registry as registry
from training.artifacts import config_hash, shipped_artifact
from training.data.evalset import EvalSet
from training.data.jsonl import load_jsonl_dataset, load_jsonl_questions
from training.mac.model import load_mac, prompt_head, save_mac
from training.mac.train import TrainConfig, train_mac, validate
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.retrain import distributed
from training.retrain.gate import GateConfig, decide, figures
from training.retrain.signal import corrupt, extend_signal, questions_of, read_signal
from training.retrain.sources import documents_from_database, documents_from_jsonl, held_out

log = logging.getLogger("freshlm.retrain")
CANARY = Path(__file__).resolve().parent.parent / "data" / "canary.jsonl"
EXIT_REJECTED, EXIT_BAD_INPUT = 3, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="freshlm retrain", description=__doc__.split("\n\n")[0])
    src = p.add_argument_group("documents")
    src.add_argument("--database-url", default=env("FRESHLM_DATABASE_URL"),
                     help="the service's SQLAlchemy URL, read-only (default $FRESHLM_DATABASE_URL)")
    src.add_argument("--jsonl", help="a JSONL export instead (training.data.jsonl format)")
    src.add_argument("--tenant", help="only this tenant's documents")
    src.add_argument("--max-documents", type=int, help="the first N documents (oldest first)")
    src.add_argument("--held-out-fraction", type=float, default=0.2)
    model = p.add_argument_group("models")
    model.add_argument("--base-model", default=env("FRESHLM_BASE_MODEL", DEFAULT_BASE_MODEL))
    model.add_argument("--qa-tuning", default=env("FRESHLM_QA_TUNING", "auto"),
                       help="QA-format artifact merged into the base: auto (the shipped one), none, or a path")
    model.add_argument("--current", help="the MAC artifact to start from and compare with (default: the "
                       "registry's serving one, else the shipped one)")
    model.add_argument("--canary", default=str(CANARY), help="labelled canary set (JSONL)")
    src.add_argument("--qa-file", help="the operator's own question/answer pairs about the documents (JSONL "
                     "questions with doc_ids; ids as the job names documents: 'tenant/id' unless --tenant): "
                     "they join the signal of their documents, training or held-out side")
    train = p.add_argument_group("training")
    train.add_argument("--questions-per-doc", type=int, default=2,
                       help="questions the model writes per document (0: only the --qa-file signal)")
    train.add_argument("--question-tokens", type=int, default=64, help="tokens generated to write a document's questions")
    train.add_argument("--answer-tokens", type=int, default=24, help="tokens of a teacher or evaluated answer")
    train.add_argument("--steps", type=int, default=200)
    train.add_argument("--docs-per-step", type=int, default=4)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-minutes", type=float, help="wall-clock budget of the whole job (signal, training, gate)")
    train.add_argument("--corrupt-signal", choices=["shuffle", "constant"],
                       help="deliberately break the training signal (to check that the gate rejects it)")
    gate = p.add_argument_group("gate and registration")
    gate.add_argument("--f1-tolerance", type=float, default=GateConfig().f1_tolerance)
    gate.add_argument("--nll-tolerance", type=float, default=GateConfig().nll_tolerance)
    gate.add_argument("--registry-url", help="where to register (default: --database-url; none with --jsonl)")
    gate.add_argument("--store", help="content-addressed artifact store shared with the service "
                      "(default $FRESHLM_DATA_DIR/artifacts)")
    gate.add_argument("--out", help="also write the accepted artifact here")
    gate.add_argument("--activate", action="store_true", help="make the registered artifact the active one")
    p.add_argument("--work-dir", default=None, help="signal, checkpoint and report (default <store>/../retrain)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _qa_tuning(value: str | None, base_model: str) -> str | None:
    if value in (None, "none"):
        return None
    if value == "auto":
        path = shipped_artifact("qa-format", base_model)
        return str(path) if path else None
    return value


def current_artifact(args, registry_url: str | None, base_model: str) -> tuple[Path, str | None]:
    """(path, registry id or None) of the artifact to start from and compare with."""
    if args.current:
        return Path(args.current), None
    if registry_url:
        engine = registry.open_engine(registry_url)
        try:
            pointer = registry.pointer(engine, "mac")
            row = registry.get(engine, pointer["serving_id"]) if pointer else None
        finally:
            engine.dispose()
        if row is not None:
            return Path(row["path"]), row["id"]
    shipped = shipped_artifact("mac", base_model)
    if shipped is None:
        raise SystemExit(f"no current MAC artifact: give --current (none is registered or ships for {base_model!r})")
    return shipped, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    rank, world = distributed.init()
    progress = not args.no_progress and rank == 0
    if not args.jsonl and not args.database_url:
        print("freshlm retrain: give --database-url (or FRESHLM_DATABASE_URL) or --jsonl", file=sys.stderr)
        return EXIT_BAD_INPUT
    registry_url = args.registry_url or (args.database_url if not args.jsonl else None)
    store = Path(args.store) if args.store else registry.default_store()
    work = Path(args.work_dir) if args.work_dir else store.parent / "retrain"

    docs = documents_from_jsonl(args.jsonl, args.max_documents) if args.jsonl else \
        documents_from_database(args.database_url, args.tenant, args.max_documents)
    held = [d for d in docs if held_out(d, args.held_out_fraction)]
    train_docs = [d for d in docs if not held_out(d, args.held_out_fraction)]
    if len(train_docs) < args.docs_per_step or not held:
        print(f"freshlm retrain: {len(docs)} documents ({len(train_docs)} to train on, {len(held)} held out) are "
              f"too few: need at least --docs-per-step={args.docs_per_step} to train on and one held out",
              file=sys.stderr)
        return EXIT_BAD_INPUT

    settings = ModelSettings(base_model=args.base_model)
    base, tokenizer = load_causal_lm(args.base_model, settings)
    qa_tuning = _qa_tuning(args.qa_tuning, args.base_model)
    writer = None  # the untuned base writes the questions (``signal``): the tuned one answers instead
    if qa_tuning and args.questions_per_doc > 0:
        writer = load_causal_lm(args.base_model, settings)[0].requires_grad_(False).eval()
    if qa_tuning:
        from training.qa_tuning import apply_qa_tuning

        base = apply_qa_tuning(base, qa_tuning)
    base.requires_grad_(False).eval()
    current_path, current_id = current_artifact(args, registry_url, args.base_model)
    current_id = current_id or registry.artifact_id(current_path)
    current, manifest = load_mac(current_path, base.config, settings=settings)
    candidate, _ = load_mac(current_path, base.config, encoder=(current.encoder, current.encoder_tokenizer))
    current.to(base.device)
    candidate.to(base.device)
    log.info("%d documents: %d to train on, %d held out; starting from MAC artifact %s (%s)",
             len(docs), len(train_docs), len(held), current_id[:12], current_path)

    # 2. the signal (each process writes its share; all read all of it)
    # the signal depends on the base model only: later runs reuse it and write only new documents'
    signal_dir = work / f"signal-{config_hash(base.config)}"
    signal_files = [signal_dir / f"signal.{r}.jsonl" for r in range(world)]
    run_dir = work / f"{current_id[:16]}{'-' + args.corrupt_signal if args.corrupt_signal else ''}"
    signal_deadline = started + 0.5 * (deadline - started) if deadline else None
    mine = [d for i, d in enumerate(docs) if i % world == rank]
    loaded = time.monotonic()
    written = 0
    if args.questions_per_doc > 0:
        written = extend_signal(base, tokenizer, mine, signal_files[rank], args.questions_per_doc, signal_deadline,
                                progress, question_tokens=args.question_tokens, answer_tokens=args.answer_tokens,
                                writer=writer)
    writer = None  # free it before training
    distributed.barrier()
    signal_done = time.monotonic()
    signal = read_signal(signal_files)
    train_questions = questions_of(signal, train_docs)
    held_questions = questions_of(signal, held)
    if args.qa_file:
        given = load_jsonl_questions(args.qa_file)
        train_ids, held_ids = {d.id for d in train_docs}, {d.id for d in held}
        train_questions += [q for q in given if len(q.doc_ids) == 1 and q.doc_ids[0] in train_ids and q.answers]
        held_questions += [q for q in given if len(q.doc_ids) == 1 and q.doc_ids[0] in held_ids and q.answers]
    if args.corrupt_signal:
        train_questions = corrupt(train_questions, args.corrupt_signal, args.seed)
    trainable = {q.doc_ids[0] for q in train_questions}
    if len(trainable) < args.docs_per_step or not held_questions:
        print(f"freshlm retrain: the signal covers {len(trainable)} training and "
              f"{len({q.doc_ids[0] for q in held_questions})} held-out documents so far: too few (run again to "
              "resume writing it, or give more --max-minutes)", file=sys.stderr)
        return EXIT_BAD_INPUT
    train_set = EvalSet("retrain", "train", [d for d in train_docs if d.id in trainable], train_questions)
    held_set = EvalSet("retrain", "held_out", held, held_questions)

    # 3. training, from the current weights (resumable; the first validation is the current artifact's)
    remaining = (deadline - time.monotonic()) / 60 if deadline else None
    cfg = TrainConfig(steps=args.steps, docs_per_step=args.docs_per_step, lr=args.lr, warmup_steps=min(20, args.steps),
                      eval_every=args.steps, val_docs=len(held), val_questions=len(held_questions),
                      checkpoint_every=max(1, args.steps // 10), seed=args.seed, val_answer_tokens=args.answer_tokens,
                      max_minutes=None if remaining is None else max(remaining * 0.6, 0.1))
    state = train_mac(candidate, base, tokenizer, train_set, held_set, cfg, checkpoint=run_dir / "mac.ckpt.pt",
                      progress=progress, shard=(rank, world),
                      reduce_grads=distributed.reduce_grads if world > 1 else None)
    trained = time.monotonic()
    if rank != 0:
        distributed.finish()
        return 0
    validations = [h for h in state["history"] if "f1" in h]

    # 4. the gate
    head = prompt_head(base, tokenizer)
    canary = load_jsonl_dataset(args.canary)
    evaluate = lambda mac: figures(validate(mac, base, tokenizer, canary.documents, canary.questions, top_k=1,
                                            head=head, max_new_tokens=args.answer_tokens))
    results = {"current": {"held_out": figures(validations[0]), "canary": evaluate(current)},
               "new": {"held_out": figures(validations[-1]), "canary": evaluate(candidate)}}
    gated = time.monotonic()
    accepted, reasons = decide(results["current"], results["new"],
                               GateConfig(f1_tolerance=args.f1_tolerance, nll_tolerance=args.nll_tolerance))
    report = {
        "decision": "registered" if accepted else "rejected", "reasons": reasons, "figures": results,
        "parent": current_id, "documents": len(docs), "train_documents": len(trainable),
        "held_out_documents": len(held), "train_questions": len(train_questions),
        "held_out_questions": len(held_questions), "canary_questions": len(canary.questions),
        "corrupt_signal": args.corrupt_signal, "steps": state["step"], "processes": world,
        "minutes": round((time.monotonic() - started) / 60, 2),
        # where the time went (this run; a resumed signal was partly written before): the signal
        # documents written by this process, and minutes of loading, signal, training (incl. its
        # two held-out validations) and the canary evaluation
        "signal_documents_written": written,
        "phase_minutes": {"load": round((loaded - started) / 60, 2), "signal": round((signal_done - loaded) / 60, 2),
                          "train": round((trained - signal_done) / 60, 2), "canary": round((gated - trained) / 60, 2)},
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }

    # 5. register only what passed; a rejected candidate is kept in the work dir (never registered)
    # so that the operator can measure what the gate refused
    candidate_dir = run_dir / ("candidate" if accepted else "rejected")
    metrics = {"retrain": {k: v for k, v in report.items() if k != "decision"}}
    save_mac(candidate_dir, candidate, base_model=args.base_model, base_config=base.config,
             encoder=manifest.config["encoder"], metrics=metrics,
             training_data={"source": "self-written questions + prompted-model answers on ingested documents",
                            "documents": args.jsonl or "service database", "parent": current_id,
                            "qa_tuning": qa_tuning})
    if not accepted:
        report["rejected_candidate"] = str(candidate_dir)
    if accepted:
        if args.out:
            save_mac(args.out, candidate, base_model=args.base_model, base_config=base.config,
                     encoder=manifest.config["encoder"], metrics=metrics)
        if registry_url:
            new_id, stored = registry.store_artifact(candidate_dir, store)
            engine = registry.open_engine(registry_url)
            try:
                registry.register(engine, stored, source="retrain", parent=current_id, metrics=metrics)
                if args.activate:
                    registry.activate(engine, new_id)
            finally:
                engine.dispose()
            report.update(artifact=new_id, path=str(stored), activated=args.activate)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (work / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("decision", "reasons", "figures")} | {"artifact": report.get("artifact")}))
    distributed.finish()
    return 0 if accepted else EXIT_REJECTED


if __name__ == "__main__":
    sys.exit(main())
