"""Merge result JSONs of the same evaluation run in parts (methods in separate processes) into
one, and redraw its plot.

    python -m training.eval.results_merge var/results/squad-seq-test.*.json --out docs/results/squad-seq-test.json
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from training.eval.cli import PREDICTIONS
from training.eval.results_plot import plot_results

_SAME = ("dataset", "split", "n_documents", "n_questions", "base_model")


def merge_results(parts: list[dict]) -> dict:
    if not parts:
        raise ValueError("nothing to merge")
    merged = json.loads(json.dumps(parts[0]))
    merged["config"]["commands"] = [p["config"].get("command") for p in parts]
    for part in parts[1:]:
        for key in _SAME:
            if part[key] != merged[key]:
                raise ValueError(f"cannot merge results with different {key}: {part[key]!r} vs {merged[key]!r}")
        merged["methods"].update(part["methods"])
        if part.get("retention"):
            merged.setdefault("retention", {}).update(part["retention"])
        merged["config"]["lr_selection"].update(part["config"].get("lr_selection", {}))
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    merged = merge_results([json.loads(Path(p).read_text()) for p in args.parts])
    out = Path(args.out)
    predictions = [Path(p).with_suffix(PREDICTIONS) for p in args.parts]
    texts = [gzip.open(p, "rt").read() for p in predictions if p.exists()]  # all read before --out may overwrite one
    out.write_text(json.dumps(merged, indent=2) + "\n")
    with gzip.open(out.with_suffix(PREDICTIONS), "wt") as handle:
        handle.write("".join(texts))
    plot_results(merged, out.with_suffix(".png"))
    print(f"wrote {out} ({', '.join(merged['methods'])})")


if __name__ == "__main__":
    main()
