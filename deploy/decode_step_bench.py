"""What a decoding step and a lone answer cost with the linear layers packed for oneDNN and without
(``training.packed_linear``), in one process, the two models taking turns so both meet the same
minutes of the machine: the figures behind ``FRESHLM_CPU_PACKED_LINEARS`` in docs/BENCHMARKS.md.

    OMP_NUM_THREADS=1 python deploy/decode_step_bench.py --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from training.decode_batch import DecodeBatch
from training.models import ModelSettings, load_causal_lm


def step_seconds(model, pad_id: int, prompt: torch.Tensor, rows: int, steps: int) -> float:
    """Mean seconds of a decoding step of ``rows`` rows after ``prompt`` (no stop token)."""
    batch = DecodeBatch(model, stop_ids=set(), pad_id=pad_id)
    batch.admit([prompt.clone() for _ in range(rows)], list(range(rows)), [steps + 4] * rows)
    for _ in range(2):
        batch.step()
    began = time.perf_counter()
    for _ in range(steps):
        batch.step()
    return (time.perf_counter() - began) / steps


def answer_seconds(model, pad_id: int, prompt: torch.Tensor, tokens: int) -> float:
    """Seconds of a lone answer: the prompt's prefill and ``tokens`` tokens."""
    began = time.perf_counter()
    batch = DecodeBatch(model, stop_ids=set(), pad_id=pad_id)
    batch.admit([prompt], [0], [tokens])
    while batch.rows:
        batch.step()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="decoding steps timed per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=270)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {name: load_causal_lm(settings=ModelSettings(cpu_packed_linears=packed))
              for name, packed in (("mkl", False), ("packed", True))}
    pad_id = models["mkl"][1].pad_token_id
    prompt = torch.randint(100, 20000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0))
    results: dict[str, dict[str, list[float]]] = {name: {"1 row": [], "8 rows": [], "answer": []} for name in models}
    for _ in range(args.rounds):
        for name, (model, _) in models.items():
            results[name]["1 row"].append(step_seconds(model, pad_id, prompt, 1, args.steps))
            results[name]["8 rows"].append(step_seconds(model, pad_id, prompt, 8, args.steps))
            results[name]["answer"].append(answer_seconds(model, pad_id, prompt, 5))
    print(f"SmolLM2-135M, one thread, {args.prompt_tokens}-token prompt, median of {args.rounds} rounds:")
    for name, measured in results.items():
        one, eight, answer = (statistics.median(measured[k]) for k in ("1 row", "8 rows", "answer"))
        print(f"  {name:7s} step 1 row {1000 * one:6.1f} ms, 8 rows {1000 * eight:6.1f} ms "
              f"({eight / one:.2f}x); lone answer (prefill + 4 steps) {answer:.3f} s")
    ratios = [p / m for p, m in zip(results["packed"]["answer"], results["mkl"]["answer"])]
    print(f"  lone answer packed / mkl, median of paired rounds: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
