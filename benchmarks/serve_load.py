"""Bounded load test of the M2Rec service on the loopback interface: N requests from C concurrent clients.

Reports p50/p95/p99 latency, requests per second and errors, writes benchmarks/results/serve.json and prints it.
Targets (2 CPU cores, the ml-100k model): p99 <= 50 ms and >= 200 requests/s at 16 clients, no errors.

    # against a running server
    python benchmarks/serve_load.py --url http://127.0.0.1:3000 --data data/ml-100k
    # or start `bentoml serve` of a packaged Bento on a free port, load it, stop it
    python benchmarks/serve_load.py --bento m2rec_service:latest --bentoml-home ~/bentoml --data data/ml-100k

Requests are POST /recommend for users drawn (seeded) from the prepared dataset in --data, so every request goes
through the Feast online lookup and the model. The client runs on the same machine: its CPU use counts against
the server's.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from m2rec.serving.launcher import bentoml_serve

RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
TARGETS = {"p99_ms": 50.0, "requests_per_s": 200.0, "errors": 0}


@contextmanager
def serve(bento: str, bentoml_home: str | None, workers: int, log_path: Path) -> Iterator[str]:
    """`bentoml serve BENTO` with `workers` processes on a free loopback port for the duration of the block."""
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true",
           "BENTOML_CONFIG_OPTIONS": f"services.m2rec_service.workers={workers}",
           **({"BENTOML_HOME": bentoml_home} if bentoml_home else {})}
    with bentoml_serve(bento, env, log_path) as url:
        yield url


async def load(url: str, users: list[str], requests: int, concurrency: int, k: int, seed: int
               ) -> tuple[np.ndarray, dict[str, int], float, dict]:
    """Send `requests` POST /recommend from `concurrency` clients; return latencies (s), error counts by kind,
    the wall time and one response body."""
    import aiohttp

    rng = random.Random(seed)
    bodies = [json.dumps({"user_id": rng.choice(users), "k": k}).encode() for _ in range(requests)]
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
    return {
        "requests": len(latencies), "errors": sum(errors.values()), "errors_by_kind": errors,
        "seconds": round(wall, 3), "requests_per_s": round(len(latencies) / wall, 1),
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2),
                       "p99": round(float(np.percentile(ms, 99)), 2), "mean": round(float(ms.mean()), 2),
                       "max": round(float(ms.max()), 2)},
    }


def run(url: str, args: argparse.Namespace) -> dict:
    import pandas as pd

    users = pd.read_parquet(Path(args.data) / "interactions.parquet", columns=["user_id"])["user_id"]
    users = sorted(users.astype(str).unique())
    asyncio.run(load(url, users, args.warmup, args.concurrency, args.k, args.seed + 1))  # not measured
    load_before = os.getloadavg()
    latencies, errors, wall, sample = asyncio.run(load(url, users, args.requests, args.concurrency, args.k,
                                                       args.seed))
    result = summarize(latencies, errors, wall)
    result["targets"] = TARGETS
    result["targets_met"] = {"p99_ms": result["latency_ms"]["p99"] <= TARGETS["p99_ms"],
                             "requests_per_s": result["requests_per_s"] >= TARGETS["requests_per_s"],
                             "errors": result["errors"] <= TARGETS["errors"]}
    result["setup"] = {
        "url": url, "endpoint": "POST /recommend", "bento": args.bento,
        "workers": args.workers if args.bento else None,
        "data": str(args.data),
        "users": len(users), "concurrency": args.concurrency, "warmup_requests": args.warmup, "k": args.k,
        "model_version": sample.get("model_version"), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "client and server share the machine's CPUs",
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="A running service, e.g. http://127.0.0.1:3000.")
    target.add_argument("--bento", help="A Bento tag to serve on a free loopback port for the test.")
    parser.add_argument("--bentoml-home", help="BENTOML_HOME holding --bento.")
    parser.add_argument("--workers", type=int, default=1, help="Server processes for --bento.")
    parser.add_argument("--data", required=True, help="Prepared dataset the model was trained on (its users).")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.url:
        result = run(args.url.rstrip("/"), args)
    else:
        log_path = Path(tempfile.mkdtemp(prefix="m2rec-serve-load-")) / "serve.log"
        with serve(args.bento, args.bentoml_home, args.workers, log_path) as url:
            result = run(url, args)
        result["setup"]["server_log"] = str(log_path)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
