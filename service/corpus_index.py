"""The retrieval index of each tenant's ingested documents, kept current off the request path.

An answer only searches (``search``): it never reads SQL for the index nor builds it. The index
changes where documents change:

* the embedded worker adds a document just before the commit that marks it ingested
  (``commit_ingested``), so anyone who sees ``ingested`` can retrieve it;
* a delete removes it right after its commit (``remove``);
* ``refresh`` (at start, then every ``FRESHLM_INDEX_REFRESH_SECONDS`` in a background thread)
  catches up with what other processes did (a separate ``freshlm-worker``, another API replica):
  one aggregate query per pass, then only the documents that changed.

Each change costs the changed document's passages (the retriever, ``PipelineConfig.retriever``:
``training.retrieval.BM25Index``, or ``training.retrievers.DenseIndex`` / ``HybridIndex`` with the
service's sentence encoder, is updated in place). ``_changes`` serializes the writers: a refresh never interleaves with a commit or a delete,
so it cannot undo one from an older snapshot of SQL.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session

from service import documents
from service.db import Database, DocumentRecord
from training.pipeline import PipelineConfig
from training.retrieval import Passage
from training.retrievers import Embedder, Retriever, make_retriever
from training.types import Document

log = logging.getLogger("freshlm.index")
FETCH = 256  # documents read from SQL at a time while catching up


def _document(record: DocumentRecord) -> Document:
    return Document(record.id, record.text, title=record.title)


class CorpusIndex:
    def __init__(self, db: Database, config: PipelineConfig, embed: Embedder | None = None) -> None:
        if config.retriever != "bm25" and embed is None:
            raise ValueError(f"the {config.retriever} retriever needs a sentence encoder")
        self.db, self.config, self.embed = db, config, embed
        self._indexes: dict[str, Retriever] = {}
        self._versions: dict[str, tuple] = {}
        self._changes = threading.Lock()

    def _index(self, tenant: str) -> Retriever:
        if tenant not in self._indexes:
            self._indexes[tenant] = make_retriever(self.config.retriever, self.embed,
                                                   max_words=self.config.rag_passage_words,
                                                   max_chars=self.config.rag_passage_chars)
        return self._indexes[tenant]

    def search(self, tenant: str, question: str, k: int) -> list[Passage]:
        index = self._indexes.get(tenant)
        if index is None:
            return []
        return index.search(question, k=k, min_score_ratio=self.config.rag_min_score_ratio)

    def passages(self, tenant: str) -> int:
        index = self._indexes.get(tenant)
        return len(index) if index is not None else 0

    def commit_ingested(self, session: Session, record: DocumentRecord) -> None:
        """Commit ``session`` (which marks ``record`` ingested) with the document already searchable."""
        with self._changes:
            index = self._index(record.tenant_id)
            index.add([_document(record)], [record.content_hash])
            try:
                session.commit()
            except Exception:
                index.remove([record.id])
                raise

    def remove(self, tenant: str, doc_id: str) -> None:
        with self._changes:
            if tenant in self._indexes:
                self._indexes[tenant].remove([doc_id])

    def refresh(self) -> int:
        """Catch up with SQL; returns the documents added or removed."""
        with self._changes:
            with self.db.read() as session:
                versions = documents.corpus_versions(session)
            changed = 0
            for tenant in set(self._indexes) | set(versions):
                if versions.get(tenant) != self._versions.get(tenant):
                    changed += self._catch_up(tenant)
                    self._versions[tenant] = versions.get(tenant)
            return changed

    def _catch_up(self, tenant: str) -> int:
        index = self._index(tenant)
        with self.db.read() as session:
            wanted = documents.ingested_hashes(session, tenant)
        have = index.documents()
        gone = [i for i in have if i not in wanted]
        new = sorted(i for i, h in wanted.items() if have.get(i) != h)
        index.remove(gone)
        for start in range(0, len(new), FETCH):
            with self.db.read() as session:
                rows = documents.ingested(session, tenant, new[start : start + FETCH])
            index.add([_document(r) for r in rows], [r.content_hash for r in rows])
        if gone or new:
            log.info("retrieval index of tenant %s: %d documents added, %d removed", tenant, len(new), len(gone))
        return len(gone) + len(new)

    def run(self, stop: threading.Event, interval: float) -> None:
        """The background refresh loop (a database that is away is retried next pass)."""
        while not stop.wait(interval):
            try:
                self.refresh()
            except Exception:
                log.exception("retrieval index refresh failed; retrying")
