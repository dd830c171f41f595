"""Adapter versions: the store (immutable, content-addressed), the live set answering requests, and the
publisher that turns documents into versions with ``training.updates``."""
