"""The ``freshlm`` command: one entry point for the offline tools, each a module with ``main(argv)``.

    freshlm eval --dataset squad-seq --data ../shared/data/squad/dev-v1.1.json --out r.json
    freshlm qa-tune --squad ../shared/data/squad/dev-v1.1.json --out artifacts/qa-format/NAME

Every subcommand is also ``python -m <module>``; add a tool by adding a line to ``COMMANDS``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("training.eval.cli", "measure methods with the stream-then-ask protocol"),
    "qa-tune": ("training.qa_tuning", "QA-format tuning of a base model (a qa_lora artifact)"),
    "results-table": ("training.eval.results_table", "markdown tables from result JSONs"),
    "results-merge": ("training.eval.results_merge", "join result parts of one evaluation"),
    "retrain": ("training.retrain.__main__", "a new MAC artifact from the ingested documents, registered if not worse"),
    "export-artifact": ("training.artifacts", "copy an artifact with fp16 tensors (what ships in artifacts/)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}  (python -m {module})" for name, (module, help_) in COMMANDS.items()]
    return "usage: freshlm COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"freshlm: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    status = module.main(argv[1:])
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
