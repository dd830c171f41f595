"""What the MAC probes on squad-seq val share: the QA-format SmolLM2, a MAC artifact, the first 64
val paragraphs and 120 questions about them, a harness context, and F1 of predictions."""
import os

import torch

from training.data.squad import load_squad_seq
from training.mac.model import load_mac
from training.methods import MethodConfig, MethodContext
from training.metrics import squad_scores
from training.models import DEFAULT_BASE_MODEL, ModelSettings, load_causal_lm
from training.qa_tuning import apply_qa_tuning

SQUAD = os.environ.get("SQUAD", "../shared/data/squad/dev-v1.1.json")  # SQuAD v1.1 dev JSON
QA_TUNING = os.environ.get("QA_TUNING", "artifacts/qa-format/smollm2-135m-instruct")

torch.set_num_threads(1)
base, tok = load_causal_lm(DEFAULT_BASE_MODEL, ModelSettings())
base = apply_qa_tuning(base, QA_TUNING)
mac, _ = load_mac(os.environ.get("MAC_ARTIFACT", "var/artifacts/mac-kv"), base.config)
ev = load_squad_seq(SQUAD, "val")
docs = ev.documents[:64]
qs = ev.questions_about({d.id for d in docs})[:120]
ctx = MethodContext(base, tok, MethodConfig(max_new_tokens=24, batch_size=8))


def f1(predictions: list[str]) -> float:
    """Mean SQuAD F1 (percent) of predictions for ``qs``."""
    return 100 * sum(squad_scores(p, q.answers)["f1"] for p, q in zip(predictions, qs)) / len(qs)
