"""The outer loop shared by the meta-training recipes (CaMeLS, meta_ft).

Accumulates ``examples_per_update`` outer examples into one Adam step, clips, validates every
``eval_every`` updates, appends every record (with seconds per example and the process's peak
RSS, what a recipe's settings cost) to ``<run_dir>/metrics.jsonl``, checkpoints
atomically to ``<run_dir>/checkpoint.pt`` and resumes from it, and stops when the update count or
the wall-clock budget (carried across resumes) is spent. The recipes supply what differs: how one
example's loss is computed, how validation is run, which tensors are the meta-parameters.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from pydantic import BaseModel
from tqdm import tqdm

from training.eval.resources import peak_rss_mb

log = logging.getLogger(__name__)

ExampleLoss = Callable[[random.Random], tuple[torch.Tensor, dict[str, float]]]


class OuterLoopConfig(BaseModel):
    max_updates: int
    max_minutes: float
    examples_per_update: int
    eval_every: int
    checkpoint_every: int


class MetaParameters(BaseModel, arbitrary_types_allowed=True):
    """What the checkpoint saves and restores, and what the optimizer steps."""

    trainable: list[torch.Tensor]
    state_dict: Callable[[], dict[str, torch.Tensor]]
    load_state_dict: Callable[[dict[str, torch.Tensor]], None]


def append_metrics(run_dir: Path, record: dict) -> None:
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_outer_loop(
    cfg: OuterLoopConfig,
    run_dir: Path,
    meta: MetaParameters,
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    example_loss: ExampleLoss,
    validate: Callable[[dict], dict[str, float]],
    desc: str,
    postfix: Callable[[dict[str, float]], dict[str, str]],
) -> dict:
    """Train until ``cfg.max_updates`` or ``cfg.max_minutes``; return the loop state (``update``,
    ``example``, ``elapsed_minutes`` and whatever ``validate`` keeps in it). ``validate(state)`` is
    called before the first update of a fresh run and every ``eval_every`` updates."""
    state: dict = {"update": 0, "example": 0, "elapsed_minutes": 0.0}
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        meta.load_state_dict(ckpt["meta"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        rng.setstate(ckpt["rng"])
        log.info("resumed from %s at update %d", ckpt_path, state["update"])

    def save_checkpoint() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"meta": meta.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                    "rng": rng.getstate()}, tmp)
        tmp.replace(ckpt_path)

    start = time.monotonic() - state["elapsed_minutes"] * 60
    if state["update"] == 0:
        append_metrics(run_dir, {"update": 0, "val": validate(state)})
    bar = tqdm(total=cfg.max_updates, initial=state["update"], desc=desc, dynamic_ncols=True)
    while state["update"] < cfg.max_updates:
        if (time.monotonic() - start) / 60 > cfg.max_minutes:
            log.info("time budget of %.0f minutes spent", cfg.max_minutes)
            break
        optimizer.zero_grad(set_to_none=True)
        update_started = time.monotonic()
        stats_sum: dict[str, float] = {}
        for _ in range(cfg.examples_per_update):
            loss, stats = example_loss(rng)
            (loss / cfg.examples_per_update).backward(inputs=meta.trainable)
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v / cfg.examples_per_update
            state["example"] += 1
        torch.nn.utils.clip_grad_norm_(meta.trainable, 1.0)
        optimizer.step()
        state["update"] += 1
        state["elapsed_minutes"] = (time.monotonic() - start) / 60
        bar.update(1)
        bar.set_postfix(postfix(stats_sum))
        record = {"update": state["update"], "minutes": round(state["elapsed_minutes"], 2), "train": stats_sum,
                  "seconds_per_example": round((time.monotonic() - update_started) / cfg.examples_per_update, 2),
                  "peak_rss_mb": round(peak_rss_mb())}
        if state["update"] % cfg.eval_every == 0:
            record["val"] = validate(state)
            log.info("update %d val %s", state["update"], record["val"])
        append_metrics(run_dir, record)
        if state["update"] % cfg.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    save_checkpoint()
    return state
