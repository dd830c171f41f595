"""``freshlm retrain``: a new MAC artifact from what the service ingested, without labels, kept
only if it is not worse than the serving one (``__main__`` is the job; ``sources``, ``signal``,
``gate`` and ``distributed`` its pieces)."""
