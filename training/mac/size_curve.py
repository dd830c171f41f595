"""MAC quality against bytes per 256-token chunk, from harness results (issue 16's curve).

Each ``mac`` / ``mac_read:<settings>`` row of one or more result JSONs becomes a point: its F1 on
that dataset against the exact bytes one full chunk's entry takes in its storage (``doc_slots`` +
memory-token slots, every layer and key/value head, encoded by ``training.memory.encode_entry``;
the 768-byte retrieval key per document is not counted). Writes a PNG and prints a Markdown table.

    python -m training.mac.size_curve docs/results/squad-seq-test-issue16.json \\
        docs/results/realtimeqa-2024-issue16.json --out docs/results/mac-size-curve.png

Several result files of one dataset and artifact make one curve (a setting measured twice: the
first file's figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoConfig

from training.artifacts import configured_artifact
from training.mac.config import MACConfig
from training.mac.method import parse_read_settings
from training.mac.prefix import kv_geometry
from training.mac.runtime import MacReadConfig
from training.memory import encode_entry
from training.models import ModelSettings, resolve_causal_lm_path


def chunk_bytes(layers: int, kv_heads: int, head_dim: int, slots: int, storage: str) -> int:
    """Stored bytes of one chunk's entry: ``[layers, 2, kv_heads, slots, head_dim]`` in ``storage``."""
    return encode_entry(torch.randn(layers, 2, kv_heads, slots, head_dim), storage).nbytes()


def read_settings(name: str, run_config: dict) -> MacReadConfig | None:
    """The read / storage settings of a ``mac`` or ``mac_read:`` row (None for other methods)."""
    base = MacReadConfig.model_validate({k: v for k, v in run_config["methods"]["mac"].items()
                                         if k in MacReadConfig.model_fields})
    if name == "mac":
        return base
    if name.startswith("mac_read:"):
        return parse_read_settings(name.split(":", 1)[1], base)
    return None


def points(result: dict) -> list[dict]:
    """One point per MAC row of a result JSON: settings, bytes per chunk, F1 (and accuracy)."""
    config = result["config"]
    artifact = configured_artifact("mac", config["methods"]["mac_artifact"], "FRESHLM_MAC_ARTIFACT",
                                   config["methods"]["base_model"])
    manifest = json.loads((artifact / "manifest.json").read_text())
    mac = MACConfig.model_validate(manifest["config"]["mac"])
    path = resolve_causal_lm_path(manifest["base_model"], ModelSettings().cache_dir)
    layers, kv_heads, head_dim = kv_geometry(AutoConfig.from_pretrained(path, local_files_only=True))
    out = []
    for name, row in result["methods"].items():
        settings = read_settings(name, config)
        if settings is None:
            continue
        slots = (settings.doc_slots or mac.doc_slots) + mac.memory_tokens
        out.append({"method": name, "storage": settings.storage, "doc_slots": settings.doc_slots or mac.doc_slots,
                    "top_k": settings.top_k, "rerotate": settings.rerotate,
                    "bytes_per_chunk": chunk_bytes(layers, kv_heads, head_dim, slots, settings.storage),
                    "f1": row["f1"], "accuracy": row.get("accuracy")})
    return out


def _setting(point: dict) -> tuple:
    """What makes two points the same setting (two runs measuring it: one point)."""
    return point["storage"], point["doc_slots"], point["top_k"], point["rerotate"]


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, pts in curves.items():
        single = sorted((p for p in pts if p["top_k"] == 1), key=lambda p: p["bytes_per_chunk"])
        line, = ax.plot([p["bytes_per_chunk"] / 1024 for p in single], [p["f1"] for p in single], "o-",
                        label=f"{label}, top 1")
        for p in single:
            ax.annotate(f"{p['storage']}/{p['doc_slots']}", (p["bytes_per_chunk"] / 1024, p["f1"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        for p in pts:
            if p["top_k"] != 1:
                ax.plot(p["bytes_per_chunk"] / 1024, p["f1"], "^", color=line.get_color())
                ax.annotate(f"top {p['top_k']}{' rot' if p['rerotate'] else ''}", (p["bytes_per_chunk"] / 1024, p["f1"]),
                            fontsize=7, textcoords="offset points", xytext=(3, -9))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}" if str(x)[0] in "1235" else ""))
    ax.set_xlabel("KB per 256-token chunk (log)")
    ax.set_ylabel("F1")
    ax.axvline(256, color="grey", lw=0.8, ls="--")
    ax.set_title("MAC entries: F1 against size (labels: storage / document slots)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="harness result JSONs with mac / mac_read rows")
    parser.add_argument("--out", type=Path, required=True, help="the PNG")
    args = parser.parse_args(argv)
    curves = {}
    for path in args.results:
        result = json.loads(path.read_text())
        artifact = result["config"]["methods"]["mac_artifact"]  # a retrained artifact: a curve of its own
        label = f"{result['dataset']} {result['split']}" + (f" ({Path(artifact).name})" if artifact else "")
        curve = curves.setdefault(label, [])  # runs of one dataset and artifact make one curve
        seen = {_setting(p) for p in curve}
        curve += [p for p in points(result) if _setting(p) not in seen]
    plot(curves, args.out)
    print("| dataset | method | storage | doc slots | top k | bytes per chunk | F1 | choice acc. |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for label, pts in curves.items():
        for p in sorted(pts, key=lambda p: -p["bytes_per_chunk"]):
            acc = "" if p["accuracy"] is None else f"{p['accuracy']:.1f}"
            print(f"| {label} | `{p['method']}` | {p['storage']} | {p['doc_slots']} | "
                  f"{p['top_k']}{' rot' if p['rerotate'] else ''} | {p['bytes_per_chunk']:,} | {p['f1']:.1f} | {acc} |")


if __name__ == "__main__":
    main()
