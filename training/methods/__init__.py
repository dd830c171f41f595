"""Evaluated methods, by name. Later methods register themselves with ``register_method``:

    @register_method("mac")
    def build_mac(ctx: MethodContext) -> Method: ...

and are then available to the harness and the ``training.eval`` CLI.
"""

from __future__ import annotations

from collections.abc import Callable

from training.methods.online_ft import OnlineFineTuning, salient_spans_ft, uniform_ft
from training.methods.prompting import NoContext, OraclePrompt, RagBM25
from training.methods.protocol import Method, MethodConfig, MethodContext

MethodBuilder = Callable[[MethodContext], Method]

METHODS: dict[str, MethodBuilder] = {
    "no_context": NoContext,
    "oracle_prompt": OraclePrompt,
    "rag_bm25": RagBM25,
    "uniform_ft": uniform_ft,
    "salient_spans_ft": salient_spans_ft,
}
BASELINES = tuple(METHODS)
FINE_TUNING_METHODS = {"uniform_ft", "salient_spans_ft", "camels_ft"}  # methods whose lr is tuned on val
# stream methods stepping from a meta-trained init: their SGD lr can be tuned on val too (another scale)
META_FT_STREAM_METHODS = {"meta_ft", "meta_ft_4", "meta_ft_16"}


def register_method(name: str) -> Callable[[MethodBuilder], MethodBuilder]:
    def decorator(builder: MethodBuilder) -> MethodBuilder:
        METHODS[name] = builder
        return builder
    return decorator


def build_method(name: str, ctx: MethodContext) -> Method:
    try:
        builder = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}: known methods are {', '.join(METHODS)}") from None
    return builder(ctx)


__all__ = ["BASELINES", "FINE_TUNING_METHODS", "METHODS", "Method", "MethodConfig", "MethodContext",
           "OnlineFineTuning", "build_method", "register_method"]

# Methods living in their own packages register themselves when imported.
from training.mac import method as _mac_method  # noqa: E402,F401  (mac, mac_rag)
from training.camels import method as _camels_method  # noqa: E402,F401  (camels_ft)
from training.meta_ft import method as _meta_ft_method  # noqa: E402,F401  (meta_ft, meta_ft_4, meta_ft_16)
