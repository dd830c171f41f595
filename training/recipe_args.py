"""Command-line flags generated from a recipe's pydantic config, so a recipe declares each setting once.

``--inner-lr 1e-3`` sets ``inner_lr``; booleans take ``true``/``false``; nested models and lists
are given as JSON; ``none`` is None. Unset flags keep the config defaults.
"""

from __future__ import annotations

import argparse
import json
from typing import TypeVar

from pydantic import BaseModel

C = TypeVar("C", bound=BaseModel)


def parse_config(config_cls: type[C], argv: list[str] | None = None, description: str | None = None) -> C:
    parser = argparse.ArgumentParser(description=description or config_cls.__doc__)
    for name, field in config_cls.model_fields.items():
        default = "required" if field.is_required() else repr(field.default if field.default_factory is None else field.default_factory())
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
            required=field.is_required(), help=f"{field.description or ''} (default: {default})",
        )
    values = vars(parser.parse_args(argv))
    for name, raw in list(values.items()):
        annotation = str(config_cls.model_fields[name].annotation)
        if raw.lower() in ("none", "null"):
            values[name] = None
        elif raw.startswith(("{", "[")) or ("dict" in annotation or "list" in annotation):
            values[name] = json.loads(raw)
    return config_cls.model_validate(values)
