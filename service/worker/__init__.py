"""The ingest worker: claims pending documents and makes them answerable (``pipeline``), keeps the
memory bank in step with SQL (``reconciler``); ``python -m service.worker`` / ``freshlm-worker``
runs it as its own process, the API runs it as a thread by default."""
