"""The stream-then-ask harness and its CLI in quick mode (tiny random model), end to end."""

import gzip
import json

import pytest

from training.data.evalset import EvalSet
from training.eval.cli import main as eval_main
from training.eval.harness import ProtocolConfig, run_method
from training.types import Document, Question

from tests.test_data_loaders import squad_fixture

CONTRACT_METHOD_KEYS = {"f1", "em", "ingest_seconds_per_doc", "ask_seconds_p50", "ask_seconds_p95",
                        "peak_rss_mb", "memory_bytes_per_doc"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class PerfectMemory:
    """A method that answers from what it ingested (tests the protocol, not a model)."""

    name = "perfect_memory"

    def __init__(self):
        self.seen: dict[str, str] = {}
        self.asked = 0

    def ingest(self, document):
        self.seen[document.id] = document.text

    def answer(self, questions):
        self.asked += len(questions)
        return [self.seen.get(q.doc_ids[0], "") for q in questions]

    def choice_scores(self, question):
        return [float(c == self.seen.get(question.doc_ids[0])) for c in question.choices]

    def stored_bytes(self):
        return sum(len(t) for t in self.seen.values())

    def close(self):
        self.seen.clear()


def stream(n):
    docs = [Document(f"d{i}", f"fact{i}") for i in range(n)]
    questions = [Question(f"q{i}", f"fact {i}?", (f"fact{i}",), (f"d{i}",), choices=("x", f"fact{i}"),
                          answer_index=1) for i in range(n)]
    return EvalSet("toy", "test", docs, questions)


def test_protocol_scores_counts_and_retention():
    method = PerfectMemory()
    cfg = ProtocolConfig(retention_k=2, retention_m=[0, 3, 100], latency_samples=3)
    run = run_method(method, stream(8), cfg, retention=True, progress=False)
    assert run.f1 == 100.0 and run.em == 100.0 and run.accuracy == 100.0
    assert run.retention == [[0, 100.0], [3, 100.0], [6, 100.0]]  # M=100 is past the stream
    assert run.memory_bytes_per_doc == pytest.approx(len("fact0"))
    assert run.peak_rss_mb > 0 and run.ask_seconds_p95 >= run.ask_seconds_p50 >= 0
    assert method.asked == 3 + 8 + 2 * 2  # latency asks + final asks + two mid-stream retention asks
    assert not method.seen  # closed
    assert set(run.summary()) >= CONTRACT_METHOD_KEYS | {"accuracy"}


@pytest.mark.parametrize("bf16", [False, True])
def test_answers_run_under_the_configured_cpu_precision_and_ingest_does_not(bf16):
    """``ProtocolConfig.bf16`` (``--cpu-bf16``, as the service's ``FRESHLM_CPU_BF16``): answers and
    choice scores under bf16 autocast, ingest (an update's training step) in fp32."""
    import torch

    class RecordsPrecision(PerfectMemory):
        def __init__(self):
            super().__init__()
            self.autocast = {"ingest": set(), "answer": set(), "choices": set()}

        def ingest(self, document):
            self.autocast["ingest"].add(torch.is_autocast_enabled("cpu"))
            super().ingest(document)

        def answer(self, questions):
            self.autocast["answer"].add(torch.is_autocast_enabled("cpu"))
            return super().answer(questions)

        def choice_scores(self, question):
            self.autocast["choices"].add(torch.is_autocast_enabled("cpu"))
            return super().choice_scores(question)

    method = RecordsPrecision()
    run_method(method, stream(3), ProtocolConfig(latency_samples=1, bf16=bf16), progress=False)
    assert method.autocast == {"ingest": {False}, "answer": {bf16}, "choices": {bf16}}


def test_protocol_asks_after_the_whole_stream():
    class ForgetsAllButLast(PerfectMemory):
        def ingest(self, document):
            self.seen = {document.id: document.text}

    run = run_method(ForgetsAllButLast(), stream(4), ProtocolConfig(latency_samples=0), progress=False)
    assert run.f1 == 25.0 and run.retention == []


def test_cli_quick_mode_writes_contract_json_plot_and_predictions(tmp_path):
    data = squad_fixture(tmp_path / "squad.json", n_articles=10, paragraphs=2)
    out = tmp_path / "results" / "squad.json"
    result = eval_main(["--quick", "--dataset", "squad-seq", "--data", str(data), "--out", str(out),
                        "--no-progress"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert {"dataset", "split", "base_model", "n_documents", "n_questions", "config", "methods"} <= set(saved)
    assert saved["dataset"] == "squad-seq" and saved["split"] == "test"
    assert set(saved["methods"]) == {"no_context", "oracle_prompt", "rag_bm25", "uniform_ft", "salient_spans_ft"}
    for figures in saved["methods"].values():
        assert CONTRACT_METHOD_KEYS <= set(figures)
        assert 0 <= figures["f1"] <= 100
    assert "accuracy" not in saved["methods"]["no_context"]  # SQuAD has no choices
    selection = saved["config"]["lr_selection"]["uniform_ft"]
    assert selection["chosen"] in (1e-4, 1e-3) and set(selection["val_f1"]) == {"0.0001", "0.001"}
    curve = saved["retention"]["uniform_ft"]
    assert [m for m, _ in curve][:2] == [0, 2]
    assert out.with_suffix(".png").stat().st_size > 1000
    lines = gzip.open(out.with_suffix(".predictions.jsonl.gz"), "rt").read().splitlines()
    assert len(lines) == 5 * saved["n_questions"]

    # --resume keeps finished methods and runs only the missing ones
    saved["methods"].pop("rag_bm25")
    out.write_text(json.dumps(saved))
    resumed = eval_main(["--quick", "--dataset", "squad-seq", "--data", str(data), "--out", str(out),
                         "--no-progress", "--resume", "--methods", "no_context,rag_bm25"])
    assert resumed["methods"]["no_context"] == saved["methods"]["no_context"]
    assert "rag_bm25" in resumed["methods"]


def test_cli_quick_mode_on_own_jsonl_with_choices(tmp_path):
    data = tmp_path / "mine.jsonl"
    records = [{"type": "document", "id": f"d{i}", "text": f"Town {i} opened {i + 2} libraries."}
               for i in range(4)]
    records += [{"type": "question", "id": f"q{i}", "question": f"How many libraries in town {i}?",
                 "answers": [str(i + 2)], "doc_ids": [f"d{i}"], "choices": [str(i + 2), "none"],
                 "answer_index": 0} for i in range(4)]
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "mine.json"
    result = eval_main(["--quick", "--dataset", "jsonl", "--data", str(data), "--out", str(out),
                        "--methods", "no_context,oracle_prompt", "--no-progress", "--base-model", "tiny-gpt2"])
    assert result["n_questions"] == 4
    for figures in result["methods"].values():
        assert 0 <= figures["accuracy"] <= 100


def test_results_table_renders_every_method_and_the_retention_curve(tmp_path):
    from training.eval.results_table import describe

    result = {"dataset": "toy", "split": "test", "base_model": "tiny", "n_documents": 8, "n_questions": 8,
              "config": {"protocol": {"retention_k": 2}, "lr_selection": {"b": {"chosen": 0.0005}}},
              "methods": {"a": {"f1": 12.345, "em": 10.0, "accuracy": 50.0, "memory_bytes_per_doc": 123456.0},
                          "b": {"f1": 40.0, "em": 30.0}},
              "retention": {"b": [[0, 50.0], [6, 25.0]]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result))
    text = describe(path)
    assert "| `a` | 12.3 | 10.0 | 50.0 | 123,456 |" in text
    assert "| `b` (lr 0.0005) | 40.0 | 30.0 | – | – |" in text
    assert "| `b` | 50.0 | 25.0 |" in text and "M=6" in text


def test_results_merge_joins_parts_of_one_run_and_refuses_others(tmp_path):
    from training.eval.results_merge import main as merge_main, merge_results

    def part(method, n_questions=8, retention=None):
        r = {"dataset": "toy", "split": "test", "base_model": "tiny", "n_documents": 8,
             "n_questions": n_questions, "config": {"command": f"run {method}", "lr_selection": {}},
             "methods": {method: {"f1": 1.0, "em": 0.0}}}
        if retention:
            r["retention"] = {method: retention}
        return r

    merged = merge_results([part("a"), part("b", retention=[[0, 5.0]])])
    assert list(merged["methods"]) == ["a", "b"] and merged["retention"] == {"b": [[0, 5.0]]}
    assert merged["config"]["commands"] == ["run a", "run b"]
    with pytest.raises(ValueError, match="n_questions"):
        merge_results([part("a"), part("b", n_questions=9)])
    paths = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(part(name)))
        with gzip.open(path.with_suffix(".predictions.jsonl.gz"), "wt") as handle:
            handle.write(json.dumps({"method": name}) + "\n")
        paths.append(str(path))
    merge_main(paths + ["--out", str(tmp_path / "all.json")])
    assert len(gzip.open(tmp_path / "all.predictions.jsonl.gz", "rt").read().splitlines()) == 2
    assert (tmp_path / "all.png").exists()


def test_freshlm_cli_dispatches_to_the_tools(tmp_path, capsys):
    from training.cli import main as cli_main

    assert cli_main([]) == 0 and "eval" in capsys.readouterr().out
    assert cli_main(["no-such-command"]) == 2
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"type": "document", "id": "d", "text": "Norvale opened 12 libraries."},
        {"type": "question", "id": "q", "question": "How many libraries?", "answers": ["12"], "doc_ids": ["d"]},
    ]))
    out = tmp_path / "r.json"
    assert cli_main(["eval", "--quick", "--dataset", "jsonl", "--data", str(data), "--out", str(out),
                     "--methods", "no_context", "--no-progress"]) == 0
    assert json.loads(out.read_text())["methods"]["no_context"]["f1"] >= 0
