"""Re-rotated memory keys (``training.mac.rerotate``): a key cache shifted by d positions equals the
cache the model computes d positions later, and the runtime gives each entry read its own span."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.mac_helpers import tiny_mac
from training.mac.rerotate import read_offsets, rotary_embedding, shift_entry, shift_keys
from training.mac.runtime import MacReadConfig, MacRuntime
from training.memory import InMemoryMemoryBank
from training.models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cache(model, ids: torch.Tensor, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    positions = torch.arange(start, start + ids.shape[1])[None]
    out = model(input_ids=ids, position_ids=positions, use_cache=True)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def _yarn_llama() -> LlamaForCausalLM:
    """A tiny Llama whose rope type scales cos / sin (YaRN: attention_scaling != 1)."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                          "original_max_position_embeddings": 512})
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["default", "yarn"])
@pytest.mark.parametrize("offset", [1, 37, 300])
def test_a_shifted_cache_equals_the_cache_computed_at_the_shifted_positions(kind, offset):
    model = tiny_causal_lm("llama")[0] if kind == "default" else _yarn_llama()
    if kind == "yarn":
        assert rotary_embedding(model).attention_scaling != 1.0
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(offset))
    with torch.no_grad():
        written, later = _cache(model, ids, start=5), _cache(model, ids, start=5 + offset)
    rotary = rotary_embedding(model)
    for (k, v), (k_later, v_later) in zip(written, later):
        assert not torch.allclose(k, k_later, atol=1e-3)  # the positions do matter
        torch.testing.assert_close(shift_keys(k, offset, rotary), k_later, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(v, v_later)  # values carry no position
    entry = torch.stack([torch.stack([k[0], v[0]]) for k, v in written])  # [layers, 2, kv_heads, n, d]
    shifted = shift_entry(entry, offset, rotary)
    for layer, (k_later, v_later) in enumerate(later):
        torch.testing.assert_close(shifted[layer, 0], k_later[0], atol=2e-5, rtol=1e-4)


def test_models_without_rotary_positions_are_refused():
    with pytest.raises(ValueError, match="rotary"):
        rotary_embedding(tiny_causal_lm("gpt2")[0])


def test_the_best_entry_is_next_to_the_question():
    assert read_offsets(3, 100) == [200, 100, 0]
    assert read_offsets(1, 100) == [0]


def _runtime(mac, base, tok, config: MacReadConfig) -> MacRuntime:
    runtime = MacRuntime(mac, base, tok, InMemoryMemoryBank(), config)
    texts = ["The council approved the new harbour bridge on Tuesday.",
             "In 2031 the city of Norvale opened 12 libraries and 3 museums.",
             "Scientists at the Aurora Institute reported a record harvest of kelp."]
    runtime.memorize([f"d{i}" for i in range(3)], texts)
    return runtime


def test_the_runtime_reads_each_entry_at_its_own_span():
    mac, base, tok = tiny_mac()
    plain = _runtime(mac, base, tok, MacReadConfig(top_k=2))
    rotated = _runtime(mac, base, tok, MacReadConfig(top_k=2, rerotate=True))
    question = ["How many libraries opened?"]
    (k_plain, v_plain), *_ = plain.read(question, "cpu")[0]
    memory, mask, ids = rotated.read(question, "cpu")
    span = mac.start(None)
    best, second = plain.bank.get(ids[0])
    n_best = best.shape[3]
    rotary = rotary_embedding(base)
    torch.testing.assert_close(memory[0][0][0, :, :n_best], shift_keys(best[0, 0], span, rotary))
    torch.testing.assert_close(memory[0][0][0, :, n_best:], second[0, 0])  # offset 0: as written
    torch.testing.assert_close(memory[0][1], v_plain)
    assert rotated.question_start() == plain.question_start() + span
    assert rotated.question_start(entries=4) == plain.question_start() + 3 * span
    answers = rotated.answer(base, question + ["Who approved the bridge?"], max_new_tokens=3)
    assert len(answers) == 2 and all(len(read) == 2 for _, read in answers)
    assert len(rotated.choice_scores(base, question[0], ["12", "3"])) == 2
    # with one entry a read is exactly today's
    one = _runtime(mac, base, tok, MacReadConfig(top_k=1, rerotate=True))
    assert one.answer(base, question, max_new_tokens=4) == _runtime(mac, base, tok, MacReadConfig(top_k=1)).answer(
        base, question, max_new_tokens=4)


def test_mac_read_settings_parse_and_refuse_unknown_parts():
    from training.mac.method import parse_read_settings

    base = MacReadConfig()
    assert parse_read_settings("int4-k2-rot", base) == MacReadConfig(storage="int4", top_k=2, rerotate=True)
    assert parse_read_settings("kall", base).top_k is None
    assert parse_read_settings("int2-s20-k3-rot", base) == MacReadConfig(storage="int2", doc_slots=20, top_k=3,
                                                                        rerotate=True)
    assert parse_read_settings("k4v2-s40-kvzip", base) == MacReadConfig(storage="k4v2", doc_slots=40,
                                                                        slot_scores="kvzip")
    assert parse_read_settings("h2o", MacReadConfig(slot_scores="kvzip")).slot_scores == "h2o"
    with pytest.raises(ValueError, match="unknown setting"):
        parse_read_settings("int3", base)
    with pytest.raises(ValueError, match="rerotate needs a top_k"):
        parse_read_settings("kall-rot", base)
