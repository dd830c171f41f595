"""Reading a question's top-k MAC entries separately (``combine='separate'``): each entry alone,
the most confident answer weighted by key similarity kept; the harness and the service agree."""

from __future__ import annotations

import pytest
import torch

from tests.test_serving import sse_events
from tests.test_serves_what_it_benchmarks import DOCS, MAX_NEW_TOKENS, QUESTIONS, harness_answers, service_answers
from training.mac.aggregator import entry_scores
from training.mac.model import stop_token_ids, strip_head
from training.mac.prefix import greedy_generate
from training.mac.runtime import MacReadConfig, load_mac_runtime
from training.memory import InMemoryMemoryBank
from training.methods import MethodConfig
from training.models import ModelSettings, load_causal_lm
from training.prompts import extract_answer
from training.token_batches import prompt_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sharp(sharp_model_dir):
    return load_causal_lm(str(sharp_model_dir), ModelSettings(base_model=str(sharp_model_dir), device="cpu"))


def _runtime(sharp, artifact, bank, **read):
    model, tokenizer = sharp
    return load_mac_runtime(artifact, model, tokenizer, bank, MacReadConfig(storage="float16", **read))


def test_a_dominant_key_weight_answers_as_the_top_entry_read_alone(sharp, mac_artifact_dir):
    bank = InMemoryMemoryBank("float16")
    top1 = _runtime(sharp, mac_artifact_dir, bank, top_k=1)
    top1.memorize([d.id for d in DOCS], [d.text for d in DOCS])
    separate = _runtime(sharp, mac_artifact_dir, bank, top_k=3, combine="separate", separate_key_weight=1e4)
    questions = [q.question for q in QUESTIONS]
    expected = top1.answer(sharp[0], questions, max_new_tokens=MAX_NEW_TOKENS)
    assert separate.answer(sharp[0], questions, max_new_tokens=MAX_NEW_TOKENS) == expected
    assert len({text for text, _ in expected}) > 1  # not trivially equal

    question, choices = QUESTIONS[0].question, ["42 million crowns", "Ashgrove United", "27,000"]
    (key,) = top1.mac.keys([question])
    (ids,) = [read for _, read in top1.answer(sharp[0], [question], max_new_tokens=1)]
    bonus = 1e4 * entry_scores(bank, key, ids)[0]
    torch.testing.assert_close(torch.tensor(separate.choice_scores(sharp[0], question, choices)) - bonus,
                               torch.tensor(top1.choice_scores(sharp[0], question, choices)), atol=2e-3, rtol=0)


def test_without_key_weight_the_most_confident_entry_wins(sharp, mac_artifact_dir):
    bank = InMemoryMemoryBank("float16")
    separate = _runtime(sharp, mac_artifact_dir, bank, top_k=3, combine="separate", separate_key_weight=0.0)
    separate.memorize([d.id for d in DOCS], [d.text for d in DOCS])
    model, tokenizer = sharp
    not_the_nearest = 0
    for question in [q.question for q in QUESTIONS]:
        ((text, (winner,)),) = separate.answer(model, [question], max_new_tokens=MAX_NEW_TOKENS)
        not_the_nearest += winner != separate.read_entries([question])[1][0][0]
        confidence = {}
        for doc_id in bank.ids():  # each entry alone, through a bank that holds only it
            alone = InMemoryMemoryBank("float16")
            (entry,), (key,) = bank.get([doc_id]), bank.exact_keys([doc_id])
            alone.put(doc_id, entry, torch.from_numpy(key))
            one = _runtime(sharp, mac_artifact_dir, alone, top_k=1)
            ((answer, _),) = one.answer(model, [question], max_new_tokens=MAX_NEW_TOKENS)
            logprobs = [[]]
            memory, mask, _ = one.read([question], model.device)
            greedy_generate(model, [strip_head(prompt_ids(tokenizer, question, None), one.head)], memory,
                            pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(tokenizer),
                            max_new_tokens=MAX_NEW_TOKENS, head=one.head, memory_mask=mask,
                            start=one.question_start(one.head, 1), token_logprobs=logprobs)
            confidence[doc_id] = (sum(logprobs[0]) / len(logprobs[0]), answer)
        assert len(confidence) == 3  # the bank holds 3 entries: top 3 reads them all
        assert winner == max(confidence, key=lambda i: confidence[i][0]) and text == confidence[winner][1]
    assert not_the_nearest  # the choice is the model's confidence, not the key order


def test_token_logprobs_are_the_models_own(sharp):
    model, tokenizer = sharp
    prompt = tokenizer("The council of Norvale", add_special_tokens=False)["input_ids"]
    logprobs = [[]]
    (generated,) = greedy_generate(model, [prompt], None, pad_id=tokenizer.pad_token_id, stop_ids={-1},
                                   max_new_tokens=5, token_logprobs=logprobs)
    with torch.no_grad():
        full = torch.tensor([prompt + generated])
        expected = model(input_ids=full).logits[0, len(prompt) - 1 : -1].log_softmax(-1)
    expected = expected.gather(1, torch.tensor(generated)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs[0]), expected, atol=1e-4, rtol=0)


def test_separate_reading_answers_equal_through_the_harness_and_the_service(make_client, sharp_model_dir,
                                                                            mac_artifact_dir, sharp):
    read = MacReadConfig(top_k=3, combine="separate")
    config = MethodConfig(base_model=str(sharp_model_dir), mac_artifact=str(mac_artifact_dir),
                          max_new_tokens=MAX_NEW_TOKENS, mac=read)
    expected = harness_answers(*sharp, "mac", config)
    client = make_client(base_model=str(sharp_model_dir), mac_artifact=str(mac_artifact_dir), mac_top_k=3,
                         mac_combine="separate")
    served = service_answers(client, "mac")
    assert all(s["strategy"] == "mac" and len(s["memory_documents"]) == 1 for s in served)
    assert [s["answer"] for s in served] == expected
    body = {"question": QUESTIONS[0].question, "strategy": "mac", "max_new_tokens": MAX_NEW_TOKENS, "stream": True}
    with client.stream("POST", "/ask", json=body) as response:
        events = sse_events(response)
    assert events[0][0] == "token" and events[-1][0] == "done"  # the chosen answer's tokens, then the answer
    streamed = extract_answer("".join(e["text"] for k, e in events[:-1]))
    assert events[-1][1]["answer"] == expected[0] and streamed  # a stream holds whole characters only:
    assert expected[0].rstrip("\ufffd") == streamed.rstrip("\ufffd")  # the tiny model's last byte may be cut
