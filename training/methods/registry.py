"""The method registry, a leaf: methods register themselves here from their own modules.

    @register_method("mac")
    def build_mac(ctx: MethodContext) -> Method: ...

``lr_field`` names the ``MethodConfig`` field the harness may choose on a validation stream (the
fine-tuning methods' learning rate). A name ``family:arg`` (e.g. ``pipeline:mac+rag``) builds the
method registered as ``family`` with ``arg`` passed on: one builder for a parametrised family.
``training.methods.builtin`` imports every built-in method module, so importing it registers them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from training.methods.protocol import Method, MethodContext

MethodBuilder = Callable[..., Method]


@dataclass(frozen=True)
class RegisteredMethod:
    name: str
    build: MethodBuilder
    lr_field: str | None = None  # MethodConfig field tuned on val ("ft_lr", "meta_ft_lr")
    family: bool = False  # built as "name:arg", the builder takes (ctx, arg)


METHODS: dict[str, RegisteredMethod] = {}


def register_method(name: str, lr_field: str | None = None, family: bool = False) -> Callable[[MethodBuilder], MethodBuilder]:
    def decorator(builder: MethodBuilder) -> MethodBuilder:
        METHODS[name] = RegisteredMethod(name, builder, lr_field, family)
        return builder
    return decorator


def method_info(name: str) -> RegisteredMethod:
    family, _, arg = name.partition(":")
    entry = METHODS.get(family)
    if entry is None or bool(arg) != entry.family:
        known = ", ".join(f"{n}:ARG" if m.family else n for n, m in METHODS.items())
        raise ValueError(f"unknown method {name!r}: known methods are {known}")
    return entry


def build_method(name: str, ctx: MethodContext) -> Method:
    entry = method_info(name)
    if entry.family:
        method = entry.build(ctx, name.partition(":")[2])
        method.name = name
        return method
    return entry.build(ctx)
