"""Load test of the M2Rec service on the loopback interface: /recommend for users whose histories are 10, 200 and
2,000 items long, served from recurrent states and by re-encoding, at C concurrent clients.

    python benchmarks/serve_load.py --bento m2rec_service:latest --bentoml-home WORKDIR/bentoml_home \
        --data WORKDIR/data --events-url sqlite:///WORKDIR/events.db [--model-dir MODEL]

It logs each history as events of new users (`bench-...`) in the service's event log, then starts `bentoml serve`
of the Bento twice on a free port, with M2REC_RECURRENT=1 and =0, and for each history length sends --requests
POST /recommend from --concurrency clients, after one unmeasured request per user (which builds the states). Writes
benchmarks/results/serve.json: {"by_history_length": {"10"|"200"|"2000": {"recurrent"|"reencode": {"p50_ms",
"p99_ms", "requests_per_s", "errors", ...}}}, the targets, the machine and its load average} and prints it. With
--model-dir it also reports the bytes of one user's stored state. The client runs on the same machine: its CPU use
counts against the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from m2rec.serving.launcher import bentoml_serve

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
MODES = {"recurrent": "1", "reencode": "0"}  # M2REC_RECURRENT of each server
# recurrent: p99 at 2,000 items within 1.5x of p99 at 10, and p99 at 200 at most half of re-encoding's
TARGETS = {"recurrent_p99_2000_over_p99_10": 1.5, "recurrent_p99_200_over_reencode": 0.5, "errors": 0}


@contextmanager
def serve(bento: str, bentoml_home: str | None, workers: int, recurrent: str, log_path: Path) -> Iterator[str]:
    """`bentoml serve BENTO` with `workers` processes on a free loopback port for the duration of the block."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true", "M2REC_RECURRENT": recurrent,
           "BENTOML_CONFIG_OPTIONS": f"services.m2rec_service.workers={workers}",
           **({"BENTOML_HOME": bentoml_home} if bentoml_home else {})}
    with bentoml_serve(bento, env, log_path) as url:
        yield url


def log_histories(events_url: str, items: list[str], lengths: list[int], users_per_length: int, seed: int
                  ) -> dict[int, list[str]]:
    """New users with histories of each length, logged as events (oldest first, a minute apart, ending now)."""
    from m2rec.events.log import Event, EventLog

    events, rng, run = EventLog(events_url), random.Random(seed), uuid.uuid4().hex[:8]
    now = datetime.now(timezone.utc)
    users: dict[int, list[str]] = {}
    for length in lengths:
        users[length] = [f"bench-{run}-{length}-{j}" for j in range(users_per_length)]
        for user in users[length]:
            events.append([Event(user, rng.choice(items), now - timedelta(minutes=length - i), f"{user}-{i}")
                           for i in range(length)])
    return users


async def load(url: str, users: list[str], concurrency: int, k: int) -> tuple[np.ndarray, dict[str, int], float, dict]:
    """Send POST /recommend for each of `users` in turn from `concurrency` clients; return latencies (s), error
    counts by kind, the wall time and one response body."""
    import aiohttp

    requests = len(users)
    bodies = [json.dumps({"user_id": user, "k": k}).encode() for user in users]
    latencies = np.zeros(requests)
    errors: dict[str, int] = {}
    sample: dict = {}
    next_request = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_request, sample
        while next_request < requests:
            i, next_request = next_request, next_request + 1
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/recommend", data=bodies[i],
                                        headers={"Content-Type": "application/json"}) as reply:
                    payload = await reply.read()
                    if reply.status != 200:
                        errors[f"HTTP {reply.status}"] = errors.get(f"HTTP {reply.status}", 0) + 1
                    elif not sample:
                        sample = json.loads(payload)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
            latencies[i] = time.perf_counter() - start

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, errors, wall, sample


def summarize(latencies: np.ndarray, errors: dict[str, int], wall: float) -> dict:
    ms = latencies * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
            "requests_per_s": round(len(latencies) / wall, 1), "requests": len(latencies),
            "errors": sum(errors.values()), "errors_by_kind": errors}


def measure(url: str, users: dict[int, list[str]], args: argparse.Namespace) -> dict[int, dict]:
    """One cell per history length on the server at `url`, after one unmeasured request for each user."""
    everyone = [user for group in users.values() for user in group]
    asyncio.run(load(url, everyone, 1, args.k))  # every user once
    rng, cells = random.Random(args.seed), {}
    for length, group in users.items():
        drawn = [rng.choice(group) for _ in range(args.requests)]
        latencies, errors, wall, sample = asyncio.run(load(url, drawn, args.concurrency, args.k))
        cells[length] = {**summarize(latencies, errors, wall), "history_length_served": sample.get("history_length"),
                         "model_version": sample.get("model_version")}
    return cells


def targets_met(table: dict[str, dict[str, dict]]) -> dict[str, bool]:
    recurrent, reencode = ({length: table[length][mode]["p99_ms"] for length in table} for mode in MODES)
    return {
        "recurrent_p99_2000_over_p99_10": recurrent["2000"] <= TARGETS["recurrent_p99_2000_over_p99_10"]
        * recurrent["10"],
        "recurrent_p99_200_over_reencode": recurrent["200"] <= TARGETS["recurrent_p99_200_over_reencode"]
        * reencode["200"],
        "errors": all(cell["errors"] == 0 for row in table.values() for cell in row.values()),
    }


def state_bytes(model_dir: str) -> dict[str, int]:
    """Bytes of one user's stored state (16-byte header included) at each precision."""
    import torch

    from m2rec.model.factory import load_model
    from m2rec.serving.state_store import HEADER, StateCodec

    template = load_model(model_dir).init_state(1)
    return {name: StateCodec(template, dtype).nbytes + HEADER.size
            for name, dtype in (("float32", torch.float32), ("float16", torch.float16))}


def run(args: argparse.Namespace) -> dict:
    import pandas as pd

    items = sorted(pd.read_parquet(Path(args.data) / "items.parquet", columns=["item_id"])["item_id"].astype(str))
    lengths = [int(n) for n in args.lengths.split(",")]
    users = log_histories(args.events_url, items, lengths, args.users_per_length, args.seed)
    load_before = os.getloadavg()
    table: dict[str, dict[str, dict]] = {str(length): {} for length in lengths}
    for mode, recurrent in MODES.items():
        log_path = Path(tempfile.mkdtemp(prefix="m2rec-serve-load-")) / "serve.log"
        with serve(args.bento, args.bentoml_home, args.workers, recurrent, log_path) as url:
            for length, cell in measure(url, users, args).items():
                table[str(length)][mode] = cell
    result = {"by_history_length": table, "targets": TARGETS,
              "targets_met": targets_met(table) if {"10", "200", "2000"} <= set(table) else None}
    if args.model_dir:
        result["state_bytes_per_user"] = state_bytes(args.model_dir)
    result["setup"] = {
        "endpoint": "POST /recommend", "bento": args.bento, "workers": args.workers, "data": str(args.data),
        "users_per_length": args.users_per_length, "concurrency": args.concurrency, "k": args.k,
        "requests_per_cell": args.requests, "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "client and server share the machine's CPUs; other jobs may run on it (see the load average)",
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bento", required=True, help="A Bento tag to serve on a free loopback port.")
    parser.add_argument("--bentoml-home", help="BENTOML_HOME holding --bento.")
    parser.add_argument("--workers", type=int, default=1, help="Server processes.")
    parser.add_argument("--data", required=True, help="Prepared dataset the model was trained on (its items).")
    parser.add_argument("--events-url", required=True, help="The event log the Bento's service reads.")
    parser.add_argument("--model-dir", help="The served model's folder, to report a state's bytes.")
    parser.add_argument("--lengths", default="10,200,2000", help="History lengths, comma-separated.")
    parser.add_argument("--users-per-length", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2_000, help="Measured requests per length and mode.")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    result = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
