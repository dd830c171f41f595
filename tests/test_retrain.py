"""``freshlm retrain`` on a tiny random model: documents read from the service's database
(SQLite here, PostgreSQL in the compose-process test), the gate registering a trained artifact and
rejecting one trained on a deliberately broken signal (with the reasons and figures recorded), and
data parallelism under torchrun: 2 processes give the 1-process weights within float tolerance.

A tiny random model writes no usable questions and its prompted answers are empty, so the signal
here is the operator's question/answer file (``--qa-file``); the self-written signal is exercised
on the real model (docs/BENCHMARKS.md) and its parsing below.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from sqlalchemy import update

from tests.conftest import REPO_ROOT
from training import artifact_registry as registry
from training.artifacts import read_manifest
from training.retrain.__main__ import main as retrain
from training.retrain.signal import corrupt, parse_questions
from training.types import Question

NAMES = ["Ida Brandt", "Oskar Lind", "Mira Holm", "Ravi Sen", "Lea Wolff", "Tomas Berg", "Nora Kade", "Elin Voss",
         "Jon Arve", "Siri Dahl", "Per Moe", "Ulla Finn"]


def _docs() -> list[dict]:
    return [{"id": f"d{i}", "text": f"Bulletin {i}: the ferry from Norvale carried {200 + i} passengers and the "
             f"harbour master {name} signed the log on day {i}."} for i, name in enumerate(NAMES)]


def write_export(path: Path, docs: list[dict], prefix: str | None = None) -> Path:
    """Documents and the operator's questions about them (the answer is a span of each document);
    with ``prefix`` (documents named ``tenant/id`` by the database reader) the questions only."""
    with open(path, "w") as f:
        for d in docs if prefix is None else []:
            f.write(json.dumps({"type": "document", **d}) + "\n")
        for i, d in enumerate(docs):
            f.write(json.dumps({"type": "question", "id": f"q{i}", "question": "Who signed the log?",
                                "answers": [NAMES[i]], "doc_ids": [(prefix or "") + d["id"]]}) + "\n")
    return path


def small_canary(path: Path) -> Path:
    """Four labelled questions of the shipped canary (it has 40; the job takes any such file)."""
    rows = [json.loads(line) for line in (REPO_ROOT / "training" / "data" / "canary.jsonl").read_text().splitlines()]
    docs = [r for r in rows if r["type"] == "document" and r["id"] in ("c01", "c02")]
    questions = [r for r in rows if r["type"] == "question" and r["doc_ids"][0] in ("c01", "c02")][:4]
    path.write_text("".join(json.dumps(r) + "\n" for r in docs + questions))
    return path


def test_the_shipped_canary_set_is_labelled_and_self_contained():
    from training.data.jsonl import load_jsonl_dataset

    canary = load_jsonl_dataset(REPO_ROOT / "training" / "data" / "canary.jsonl")
    texts = {d.id: d.text.lower() for d in canary.documents}
    assert len(canary.questions) == 40 and len(canary.documents) == 10
    assert all(q.answers[0].lower() in texts[q.doc_ids[0]] for q in canary.questions)


def test_signal_parsing_and_corruption():
    written = "1. Who signed the log on day 3?\n2) How many passengers did the ferry carry?\nok\n2) How many passengers did the ferry carry?"
    assert parse_questions(written, 3) == ["Who signed the log on day 3?", "How many passengers did the ferry carry?"]
    assert parse_questions("Who signed the log on day 3\n\nThe harbour master signed the log.", 2) == [
        "Who signed the log on day 3?"]  # a question without its mark counts, a sentence does not
    questions = [Question(f"q{i}", "Who?", (NAMES[i],), (f"d{i}",)) for i in range(5)]
    shuffled = corrupt(questions, "shuffle")
    assert sorted(q.answers for q in shuffled) == sorted(q.answers for q in questions)
    assert all(s.answers != q.answers for s, q in zip(shuffled, questions))  # no answer stays on its question


def test_export_of_harness_streams_is_the_jobs_input(tmp_path, capsys):
    """``python -m training.eval.export``: the harness's subset of each stream, ids prefixed per
    dataset, no question lines with ``--documents-only``; the job reads it, and ``--help`` works."""
    from training.eval.export import main as export

    source = write_export(tmp_path / "stream.jsonl", _docs())
    out = tmp_path / "export.jsonl"
    assert export(["--stream", f"jsonl:{source}:all:3:2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows if r["type"] == "document"] == ["d0", "d1", "d2"]
    assert sorted(r["doc_ids"][0] for r in rows if r["type"] == "question") in (["d0", "d1"], ["d0", "d2"], ["d1", "d2"])
    other = write_export(tmp_path / "other.jsonl", [{"id": "e0", "text": "Another bulletin."}])
    assert export(["--documents-only", "--stream", f"jsonl:{source}:all:2", "--stream", f"jsonl:{other}:all",
                   "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["jsonl/d0", "jsonl/d1", "jsonl/e0"] and {r["type"] for r in rows} == {"document"}
    assert export(["--stream", "nope:x:y", "--out", str(out)]) == 2
    assert export(["--stream", f"jsonl:{source}:all", "--stream", f"jsonl:{source}:all", "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as help_exit:  # the ops guide's `python -m training.retrain --help`
        retrain(["--help"])
    assert help_exit.value.code == 0 and "--jsonl" in capsys.readouterr().out


def _service_database(url: str, docs: list[dict]) -> None:
    """A service database whose documents the worker has ingested."""
    from service.api.schemas import DocumentIn
    from service.db import DEFAULT_TENANT, DocumentRecord, open_database
    from service.documents import store_batch
    from service.migrate import upgrade_database

    db = open_database(url)
    upgrade_database(db.engine)
    with db.write() as session:
        store_batch(session, DEFAULT_TENANT, [DocumentIn(**d) for d in docs])
        session.execute(update(DocumentRecord).values(status="ingested"))
        session.commit()
    db.dispose()


def test_gate_registers_a_trained_artifact_and_rejects_a_broken_signal(tmp_path, tiny_model_dir, mac_artifact_dir,
                                                                       one_torch_thread):
    url = f"sqlite:///{tmp_path / 'service.db'}"
    _service_database(url, _docs())
    export = write_export(tmp_path / "qa.jsonl", _docs(), prefix="default/")
    engine = registry.open_engine(url)
    first = registry.register(engine, mac_artifact_dir, source="configured", activate_if_none=True)
    common = ["--database-url", url, "--qa-file", str(export), "--base-model", str(tiny_model_dir), "--qa-tuning",
              "none", "--canary", str(small_canary(tmp_path / "canary.jsonl")), "--store", str(tmp_path / "store"),
              "--work-dir", str(tmp_path / "work"), "--steps", "12", "--lr", "0.05", "--nll-tolerance", "0",
              "--f1-tolerance", "0", "--question-tokens", "8", "--answer-tokens", "4", "--no-progress"]
    assert retrain([*common, "--activate"]) == 0
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert report["decision"] == "registered" and report["parent"] == first
    second = report["artifact"]
    pointer = registry.pointer(engine, "mac")
    assert pointer["active_id"] == second and pointer["serving_id"] == first  # the worker switches the bank
    row = registry.get(engine, second)
    assert row["parent"] == first and row["source"] == "retrain" and Path(row["path"]).is_relative_to(tmp_path / "store")
    figures = read_manifest(row["path"]).metrics["retrain"]["figures"]
    assert figures["new"]["held_out"]["nll"] <= figures["current"]["held_out"]["nll"]
    assert row["metrics"]["retrain"]["figures"] == figures
    # the worker would now serve `second`; the broken signal starts from it and must not replace it
    registry.complete_switch(engine, "mac", second)
    assert retrain([*common, "--activate", "--corrupt-signal", "constant"]) == 3
    rejected = json.loads((tmp_path / "work" / "report.json").read_text())
    assert rejected["decision"] == "rejected" and rejected["parent"] == second and rejected["reasons"]
    assert any("held_out: answer NLL" in r for r in rejected["reasons"]), rejected["reasons"]
    held = rejected["figures"]
    assert held["new"]["held_out"]["nll"] > held["current"]["held_out"]["nll"]
    assert {r["id"] for r in registry.list_artifacts(engine, "mac")} == {first, second}  # nothing new registered
    kept = read_manifest(rejected["rejected_candidate"])  # kept in the work dir for the operator to measure
    assert kept.metrics["retrain"]["reasons"] == rejected["reasons"]
    assert registry.pointer(engine, "mac")["active_id"] == second
    engine.dispose()


def _torchrun(n: int, args: list[str], log: Path) -> subprocess.CompletedProcess:
    env_threads = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    import os

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           "-m", "training.retrain", *args], cwd=REPO_ROOT, env={**os.environ, **env_threads},
                          stdout=open(log, "w"), stderr=subprocess.STDOUT, timeout=600)


def test_two_processes_train_the_same_weights_as_one(tmp_path, tiny_model_dir, mac_artifact_dir, one_torch_thread):
    """The one-process run is the job's own ``main`` in this process (world size 1, nothing to
    reduce); the two-process run is ``torchrun --nproc-per-node 2`` (gloo)."""
    export = write_export(tmp_path / "export.jsonl", _docs())
    canary = small_canary(tmp_path / "canary.jsonl")
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out-{n}"
        args = ["--jsonl", str(export), "--qa-file", str(export), "--base-model", str(tiny_model_dir),
                "--qa-tuning", "none", "--current", str(mac_artifact_dir), "--canary", str(canary),
                "--work-dir", str(tmp_path / f"work-{n}"), "--steps", "6", "--lr", "0.05", "--f1-tolerance", "100",
                "--nll-tolerance", "100", "--out", str(out), "--questions-per-doc", "0", "--answer-tokens", "2",
                "--no-progress", "--threads", "1"]
        if n == 1:
            assert retrain(args) == 0
        else:
            result = _torchrun(n, args, tmp_path / f"log-{n}")
            assert result.returncode == 0, (tmp_path / f"log-{n}").read_text()[-3000:]
        outs[n] = load_file(out / "weights.safetensors")
        report = json.loads((tmp_path / f"work-{n}" / "report.json").read_text())
        assert report["processes"] == n and report["steps"] == 6
    start = load_file(mac_artifact_dir / "weights.safetensors")
    for name, one in outs[1].items():
        moved = (one - start[name]).abs().max().item()
        diff = (outs[2][name] - one).abs().max().item()
        print(f"{name}: max |1 process - start| = {moved:.3e}, max |2 processes - 1 process| = {diff:.3e}")
        assert moved > 1e-4  # training moved the weights...
        assert diff < 1e-5, name  # ...and two processes moved them the same
