"""Evaluation: the stream-then-ask harness, SQuAD metrics, the ``python -m training.eval`` CLI and
the result tables / plots / merges."""
