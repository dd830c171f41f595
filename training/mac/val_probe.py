"""What MAC's validation probes share (``storage_probe``, ``separate_probe``): the stream, model and
artifact arguments, and loading them."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from training.artifacts import configured_artifact
from training.data.evalset import EvalSet
from training.eval.cli import load_dataset
from training.mac.train import load_models
from training.models import DEFAULT_BASE_MODEL, DEFAULT_ENCODER


def add_val_stream_arguments(p: argparse.ArgumentParser) -> None:
    """The validation stream (``--dataset``, ``--data``, ``--split``, ``--max-documents``), the MAC
    artifact and QA tuning, ``--threads`` and ``--out``."""
    p.add_argument("--dataset", required=True, choices=("squad-seq", "realtimeqa"))
    p.add_argument("--data", required=True)
    p.add_argument("--split", required=True, help="a validation split: squad-seq val, or a RealTimeQA year not tested")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--mac-artifact", default=None)
    p.add_argument("--qa-tuning", default="artifacts/qa-format/smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)


def load_val_stream(args: argparse.Namespace) -> tuple[EvalSet, PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """The stream, the QA-tuned base model and its tokenizer, and the MAC artifact's directory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    evalset = load_dataset(args.dataset, args.data, args.split, 0).subset(args.max_documents)
    base, tokenizer, _, _ = load_models(DEFAULT_BASE_MODEL, DEFAULT_ENCODER, args.qa_tuning)
    artifact = configured_artifact("mac", args.mac_artifact, "FRESHLM_MAC_ARTIFACT", DEFAULT_BASE_MODEL)
    return evalset, base, tokenizer, artifact
