"""Every built-in method, registered by importing its module (the eval CLI imports this)."""

from training.camels import method as _camels  # noqa: F401  (camels_ft)
from training.mac import method as _mac  # noqa: F401  (mac, mac_rag)
from training.meta_ft import method as _meta_ft  # noqa: F401  (meta_ft, meta_ft_4, meta_ft_16, meta_ft_isolated)
from training.methods import online_ft as _online_ft  # noqa: F401  (uniform_ft, salient_spans_ft)
from training.methods import pipeline as _pipeline  # noqa: F401  (auto, pipeline:<strategy>)
from training.methods import prompting as _prompting  # noqa: F401  (no_context, oracle_prompt, rag_bm25, rag_dense, rag_hybrid)
from training.update_bank import method as _update_bank  # noqa: F401  (update_bank)

BASELINES = ("no_context", "oracle_prompt", "rag_bm25", "uniform_ft", "salient_spans_ft")
