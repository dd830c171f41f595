"""``freshlm-worker`` / ``python -m service.worker``: the ingest worker as its own process."""

from __future__ import annotations

import argparse
import json
import signal
import threading

from service import tenants
from service.core.config import Settings
from service.core.logging import configure_logging
from service.runtime import open_runtime
from service.worker.pipeline import build_worker, rebuild_adapter, run_worker
from service.worker.reconciler import reconcile_memory, reconcile_update_bank


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="freshlm-worker", description="FreshLM ingest worker (settings: FRESHLM_* variables)")
    parser.add_argument("--rebuild-memory", action="store_true", help="re-derive the memory bank (and the update bank) from SQL and exit")
    parser.add_argument("--rebuild-adapter", action="store_true", help="replay all live documents into a new adapter version and exit")
    parser.add_argument("--tenant", action="append", help="with --rebuild-*: only this tenant (repeatable; default: every tenant)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve this worker's Prometheus metrics")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_json)
    needs_model = bool(settings.updater_spec or settings.mac_artifact_path)
    with open_runtime(settings, load_model=needs_model) as rt:
        if "mac" in rt.errors:
            raise SystemExit(f"MAC artifact not loaded: {rt.errors['mac']}")
        if "update_bank" in rt.errors:
            raise SystemExit(f"update bank not loaded: {rt.errors['update_bank']}")
        worker = build_worker(rt)
        if args.rebuild_memory or args.rebuild_adapter:
            with rt.db.read() as session:
                chosen = args.tenant or tenants.tenant_ids(session)
            if args.rebuild_memory:
                zero = {"written": 0, "removed": 0}
                result = {t: {k: v for k, v in reconcile_memory(rt.db, rt.mac_for(t), t, full=True).items()
                              if k in zero} if rt.mac else dict(zero) for t in chosen}
                if rt.update_bank is not None:
                    for t in chosen:
                        result[t]["update_bank"] = {k: v for k, v in reconcile_update_bank(
                            rt.db, rt.bank_for(t), t, full=True).items() if k in zero}
            else:
                result = {t: {"version": rebuild_adapter(worker, t)} for t in chosen}
            print(json.dumps(result))
            return
        if args.metrics_port is not None:
            from prometheus_client import start_http_server

            from service.metrics import Metrics

            metrics = Metrics()
            worker.on_ingested = metrics.ingest_seconds.observe
            start_http_server(args.metrics_port, registry=metrics.registry)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            run_worker(worker, stop)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
