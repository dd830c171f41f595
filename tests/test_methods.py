"""Built-in methods on a tiny random model: the interface, what each keeps, and that fine-tuning
methods really train and then hand the base model back unchanged."""

import pytest
import torch

import training.generation as generation
from training.choice_scoring import answer_token_ids, choice_logprobs
from training.generation import chat_input_ids, generate_answer, generate_answers
from training.prefix_cache import PrefixCache, PrefixCacheConfig
from training.methods import METHODS, Method, MethodConfig, MethodContext, build_method, register_method
from training.methods.builtin import BASELINES
from training.models import tiny_causal_lm
from training.prompts import qa_messages
from training.salient_spans import salient_char_spans, salient_token_mask
from training.types import Document, Question


pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = [
    Document("d1", "The council approved the new harbour bridge on Tuesday."),
    Document("d2", "In 2031 the city of Norvale opened 12 libraries and 3 museums."),
]
QUESTIONS = [
    Question("q1", "Who approved the bridge?", ("the council",), ("d1",)),
    Question("q2", "How many libraries?", ("12",), ("d2",), choices=("12", "3 museums"), answer_index=0),
]


@pytest.fixture
def ctx():
    model, tokenizer = tiny_causal_lm("llama")
    return MethodContext(model, tokenizer, MethodConfig(max_new_tokens=4, ft_lr=1e-2))


def test_every_baseline_implements_the_protocol(ctx):
    for name in BASELINES:
        method = build_method(name, ctx)
        assert isinstance(method, Method) and method.name == name
        for doc in DOCS:
            method.ingest(doc)
        answers = method.answer(QUESTIONS)
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        assert len(method.choice_scores(QUESTIONS[1])) == 2
        assert method.stored_bytes() >= 0
        method.close()


def test_prompted_methods_put_the_right_passages_in_the_prompt(ctx):
    oracle = build_method("oracle_prompt", ctx)
    rag = build_method("rag_bm25", ctx)
    for doc in DOCS:
        oracle.ingest(doc)
        rag.ingest(doc)
    assert oracle.passages(QUESTIONS[1]) == [DOCS[1].text]
    assert rag.passages(Question("q", "Which libraries did Norvale open?", ("x",)))[0] == DOCS[1].text
    assert oracle.stored_bytes() == sum(len(d.text.encode()) for d in DOCS)
    assert build_method("no_context", ctx).passages(QUESTIONS[0]) is None


@pytest.mark.parametrize("name", ["uniform_ft", "salient_spans_ft"])
def test_online_fine_tuning_learns_and_restores_the_base(ctx, name):
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ids = ctx.tokenizer(DOCS[1].text, return_tensors="pt")["input_ids"]
    loss_before = ctx.model(input_ids=ids, labels=ids).loss.item()
    method = build_method(name, ctx)
    for _ in range(5):
        method.ingest(DOCS[1])
    assert method.updater.steps == 5 and method.updater.skipped == 0
    with torch.no_grad():
        loss_after = method.model(input_ids=ids, labels=ids).loss.item()
    assert loss_after < loss_before  # the adapter learned the document
    assert method.stored_bytes() > 0
    method.close()
    after = ctx.model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_salient_spans_cover_names_and_numbers(ctx):
    for backend in ("heuristic", "auto"):
        spans = salient_char_spans(DOCS[1].text, backend)
        covered = {DOCS[1].text[s:e] for s, e in spans}
        assert any("12" in c for c in covered) and any("Norvale" in c for c in covered)
    ids, mask = salient_token_mask(ctx.tokenizer, DOCS[1].text, 64, "heuristic")
    assert ids.shape == mask.shape and 0 < mask.sum() < len(mask)
    salient_text = ctx.tokenizer.decode(ids[mask.bool()])
    assert "12" in salient_text and "libraries" not in salient_text


def test_salient_ft_skips_documents_without_entities(ctx):
    ctx.config.ner_backend = "heuristic"
    method = build_method("salient_spans_ft", ctx)
    method.ingest(Document("x", "nothing to see here at all"))
    assert method.updater.skipped == 1 and method.updater.steps == 0
    method.close()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_and_prefix_cached_generation_match_single_generation(kind, monkeypatch):
    model, tokenizer = tiny_causal_lm(kind)
    with torch.no_grad():  # sharper logits: a random tiny model otherwise repeats one token
        for p in model.parameters():
            p.mul_(8)
    monkeypatch.setattr(generation, "extract_answer", lambda text: text)  # compare raw text, not extracted answers
    context = DOCS[0].text * 4
    prompts = [qa_messages(q, [context]) for q in ("Who approved it?", "When?", "What was approved?")]
    prompts += [qa_messages("Why?"), qa_messages("How many?", [DOCS[1].text])]
    single = [generate_answer(model, tokenizer, p, max_new_tokens=5) for p in prompts]
    assert len(set(single)) > 2  # the comparison below is not trivially true
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=5, batch_size=3) == single
    cache = PrefixCache(PrefixCacheConfig())
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=5, prefix_cache=cache) == single
    assert cache.hit_tokens > 3 * len(tokenizer(context)["input_ids"])  # the context was prefilled once
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=5, prefix_cache=cache) == single  # all cached


def test_choice_logprobs_are_length_normalised_token_logprobs(ctx):
    model, tokenizer = ctx.model, ctx.tokenizer
    messages = qa_messages("How many libraries?")
    choices = ["12", "3 museums and more"]
    scores = choice_logprobs(model, tokenizer, messages, choices)
    prompt = chat_input_ids(tokenizer, messages)[0].tolist()
    for choice, score in zip(choices, scores):
        target = answer_token_ids(tokenizer, choice)
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        expected = torch.stack([logprobs[len(prompt) - 1 + i, t] for i, t in enumerate(target)]).mean()
        assert score == pytest.approx(expected.item(), abs=1e-4)


def test_register_method_adds_a_method(ctx):
    @register_method("echo_test")
    class Echo:
        name = "echo_test"

        def __init__(self, ctx):
            pass

        def ingest(self, document): ...
        def answer(self, questions): return [q.answers[0] for q in questions]
        def choice_scores(self, question): return [1.0] + [0.0] * (len(question.choices) - 1)
        def stored_bytes(self): return 0
        def close(self): ...

    try:
        assert build_method("echo_test", ctx).answer(QUESTIONS) == ["the council", "12"]
    finally:
        METHODS.pop("echo_test")
    with pytest.raises(ValueError, match="unknown method"):
        build_method("echo_test", ctx)
