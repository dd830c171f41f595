"""Live pickup of activated artifacts, without a restart.

* API processes *follow*: every ``FRESHLM_ARTIFACT_POLL_SECONDS`` they read the registry's serving
  MAC artifact and, when it changed, load it and answer with it from the next request on (the way
  the adapter pointer is read per request).
* The worker *switches*: when the active MAC artifact differs from the serving one, it writes the
  new artifact's memory bank (``bank_name``: one bank per artifact, one per tenant) a few documents
  per loop pass, between claimed batches, so ingestion goes on; answers keep reading the old bank.
  When nothing is missing it moves the serving pointer in one SQL update and writes new documents
  with the new artifact from then on. The catch-up and the switch run on the worker's own loop, so
  no document is ingested between the last catch-up and the switch.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from service import tenants
from service.runtime import Runtime, tenant_bank
from service.worker.reconciler import reconcile_memory
from training import artifact_registry as registry
from training.mac.runtime import MacRuntime
from training.memory import RedisMemoryBank

log = logging.getLogger("freshlm.artifacts")


def follow_serving(rt: Runtime) -> bool:
    """Load the serving MAC artifact if it is not the one in use. Returns whether it changed."""
    if rt.mac is None or rt.model is None:
        return False
    current = registry.pointer(rt.db.engine, "mac")
    if current is None or current["serving_id"] == rt.mac_id:
        return False
    row = registry.get(rt.db.engine, current["serving_id"])
    try:
        runtime = rt.mac_runtime(row["path"])
    except Exception as exc:  # keep answering with the old one; /readyz says why
        rt.errors["mac_switch"] = f"{row['id']}: {exc.__class__.__name__}: {exc}"
        log.error("serving MAC artifact %s not loaded: %s", row["id"], exc)
        return False
    rt.errors.pop("mac_switch", None)
    rt.use_mac(row["id"], runtime)
    log.info("now answering with MAC artifact %s", row["id"])
    return True


def run_follower(rt: Runtime, stop: threading.Event, every: float) -> None:
    while not stop.wait(every):
        try:
            follow_serving(rt)
        except Exception:  # database away: the next poll retries
            log.exception("artifact poll failed")


class BankSwitch:
    """The worker's side: writes the active MAC artifact's bank and switches to it when complete."""

    def __init__(self, rt: Runtime, chunk: int = 16) -> None:
        self.rt = rt
        self.chunk = chunk
        self._target: tuple[str, MacRuntime] | None = None

    def _runtime(self, ident: str) -> MacRuntime:
        if self._target is None or self._target[0] != ident:
            row = registry.get(self.rt.db.engine, ident)
            self._target = (ident, self.rt.mac_runtime(Path(row["path"])))
        return self._target[1]

    def step(self) -> bool:
        """One bounded piece of work; returns whether there was any (a switch is under way)."""
        rt = self.rt
        if rt.mac is None:
            return False
        current = registry.pointer(rt.db.engine, "mac")
        if current is None or current["active_id"] == rt.mac_id:
            return False
        target_id = current["active_id"]
        try:
            target = self._runtime(target_id)
        except Exception as exc:
            rt.errors["mac_switch"] = f"{target_id}: {exc.__class__.__name__}: {exc}"
            log.error("active MAC artifact %s not loadable, staying on %s: %s", target_id, rt.mac_id, exc)
            return False
        with rt.db.read() as session:
            ids = tenants.tenant_ids(session)
        budget, done, total = self.chunk, 0, 0
        for tenant in ids:
            view = target.with_bank(RedisMemoryBank(rt.redis, bank=tenant_bank(target.bank.bank, tenant),
                                                    storage=rt.settings.mac_storage))
            result = reconcile_memory(rt.db, view, tenant, limit=budget)
            budget -= result["written"]
            done += result["wanted"] - result["remaining"]
            total += result["wanted"]
        if done < total:
            registry.set_progress(rt.db.engine, "mac", target_id, done, total)
            log.info("writing the memory bank of MAC artifact %s: %d / %d entries", target_id, done, total)
            return True
        if registry.complete_switch(rt.db.engine, "mac", target_id):
            rt.use_mac(target_id, target)
            rt.errors.pop("mac_switch", None)
            self._target = None
            log.info("memory bank of MAC artifact %s complete (%d entries): switched", target_id, total)
        return True
