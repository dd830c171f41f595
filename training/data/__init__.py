"""Dataset loaders: each turns files on disk into an ``EvalSet`` (a document stream + questions).

Paths are always arguments: the data lives outside the repository (``../shared/data``).
"""

from training.data.evalset import EvalSet
from training.data.jsonl import load_jsonl_dataset, write_jsonl_dataset
from training.data.news_stream import load_news_stream
from training.data.realtimeqa import load_realtimeqa
from training.data.squad import SquadSplits, load_squad_seq, split_articles

__all__ = [
    "EvalSet",
    "SquadSplits",
    "load_jsonl_dataset",
    "load_news_stream",
    "load_realtimeqa",
    "load_squad_seq",
    "split_articles",
    "write_jsonl_dataset",
]
