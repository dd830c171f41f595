"""Throughput of one server over consecutive locust phases (``deploy/load_run.py``'s helpers): does
a fresh server run slower at first, and does a change hold once it is warm? Each phase is 8
askers (``--askers``), plain or streaming, with the feeder; prints answers/s and p50 per phase.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python deploy/phase_drift.py --phases plain,stream,plain --seconds 45
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from load_run import SERVER_ENV, demo_documents, run_locust, serve, stop_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", default="plain,stream,plain", help="comma list of plain / stream")
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--askers", type=int, default=8)
    parser.add_argument("--env", action="append", default=[], help="FRESHLM_X=value for the server (repeatable)")
    args = parser.parse_args()
    env = {**SERVER_ENV, "FRESHLM_MAX_BATCH_ASKS": str(args.askers), **dict(item.split("=", 1) for item in args.env)}
    server, base, _ = serve(env, demo_documents())
    out = Path(tempfile.mkdtemp(prefix="freshlm-drift-"))
    try:
        for i, phase in enumerate(args.phases.split(",")):
            stream = phase == "stream"
            result = run_locust(base, args.askers, args.seconds, {"BENCH_STREAM": "1"} if stream else {}, out,
                                f"{i}-{phase}")
            stats = result["stats"]["/ask stream" if stream else "/ask"]
            print(f"{i} {phase}: {stats['per_s']:.2f} answers/s, p50 {stats['p50_s']} s, "
                  f"load average before {result['load_average_before']}", flush=True)
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
