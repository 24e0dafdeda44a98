"""The production loop, end to end, on this machine: a scheduled retraining next to a live `bentoml serve`.

    python benchmarks/loop.py [--tiny] [--workdir DIR]
    python benchmarks/loop.py --restart --clients 6 --events 150   # a crash of the service mid-traffic

1. Cycle 1: the pipeline (kfp.local) trains, registers v1 as champion and packages it; `bentoml serve` (2 workers)
   starts on the Bento and follows the `champion` alias (polled every second here).
2. While 8 clients keep sending /recommend and /events (hundreds of events for dozens of users, some late within
   the window, some retried with the same `event_id`):
   - cycle 2a runs the pipeline with a gate it cannot pass: the service must answer exactly as before, every event
     kept;
   - cycle 2b runs it with a gate it passes: the service must move to v2 without a restart.
3. Then it checks, against the event log, version 2's prepared training data and the online store: every accepted
   event is logged once, in its user's online sequence and, up to v2's cutoff, in v2's training data exactly once.

Writes benchmarks/results/loop.json: {"events": {"sent", "accepted", "lost", "duplicated", ...}, "swap": {"non_2xx",
"seconds_to_new_version", ...}, ...}. `tests/test_loop.py` runs the same scenario on tiny data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import requests

from m2rec.serving.launcher import bentoml_serve, bentoml_server, free_port

RESULTS = Path(__file__).resolve().parent / "results" / "loop.json"
M2REC = Path(sys.executable).parent / "m2rec"
TINY = ["-S", "synthetic.n_users=120", "-S", "synthetic.n_items=80", "-S", "synthetic.max_length=30",
        "-S", "model.hidden_size=16", "-S", "model.d_state=8", "-S", "model.max_length=20"]
RELOAD_TOKEN = uuid.uuid4().hex


@dataclass
class Traffic:
    """What the clients sent and got back, shared by their threads."""

    events_budget: int
    events_per_s: float  # spread over the whole scenario, so events also arrive during each cycle and the swap
    started: float = field(default_factory=time.time)
    sent: int = 0  # distinct events sent (a retry is not a new event)
    retries: int = 0
    accepted: dict[str, dict] = field(default_factory=dict)  # event_id -> the event, from 2xx replies
    duplicate_replies: int = 0  # retries answered "duplicate": applied once
    requests: int = 0
    non_2xx: list[str] = field(default_factory=list)
    versions: list[tuple[float, str]] = field(default_factory=list)  # (time, model_version) of each reply
    retry_until_acknowledged: bool = False  # an event whose request failed is sent again, same event_id
    resent_after_failure: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)


def run_pipeline(workdir: Path, extra: list[str], log_path: Path) -> dict:
    """`m2rec run` in `workdir`; its summary (WORKDIR/summary.json)."""
    command = [str(M2REC), "run", "--workdir", str(workdir), *extra]
    with open(log_path, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}); log: {log_path}")
    return json.loads((workdir / "summary.json").read_text())


def client(url: str, users: list[str], items: list[str], traffic: Traffic, seed: int) -> None:
    """One client: /recommend and /events in turns until told to stop; events until the shared budget is spent."""
    rng = random.Random(seed)
    session = requests.Session()
    while not traffic.stop.is_set():
        user = rng.choice(users)
        with traffic.lock:
            allowed = min(traffic.events_budget, traffic.events_per_s * (time.time() - traffic.started))
            send_event = traffic.sent < allowed and rng.random() < 0.6
            if send_event:
                traffic.sent += 1
        if send_event:
            now = datetime.now(timezone.utc)
            late = rng.random() < 0.2  # late, within the window: placed in time order
            body = {"user_id": user, "item_id": rng.choice(items), "event_id": f"c{seed}-{uuid.uuid4().hex[:12]}",
                    "timestamp": (now - timedelta(minutes=rng.uniform(1, 120)) if late else now).isoformat()}
            attempts = 2 if rng.random() < 0.15 else 1  # a retry of the same event
            for attempt in range(attempts):
                reply = _post(session, url, "/events", body, traffic)
                while reply is None and traffic.retry_until_acknowledged and not traffic.stop.is_set():
                    time.sleep(0.2)  # the service is down or restarting: a real client retries the same event
                    with traffic.lock:
                        traffic.resent_after_failure += 1
                    reply = _post(session, url, "/events", body, traffic)
                if reply is not None:
                    with traffic.lock:
                        traffic.accepted[body["event_id"]] = body
                        traffic.duplicate_replies += bool(reply.get("duplicate"))
                        traffic.retries += attempt
        else:
            _post(session, url, "/recommend", {"user_id": user, "k": 5}, traffic)
        time.sleep(0.05)


def _post(session: requests.Session, url: str, path: str, body: dict, traffic: Traffic) -> dict | None:
    try:
        reply = session.post(f"{url}{path}", json=body, timeout=60)
    except requests.RequestException as err:
        with traffic.lock:
            traffic.requests += 1
            traffic.non_2xx.append(f"{path}: {err}")
        return None
    with traffic.lock:
        traffic.requests += 1
        if reply.status_code // 100 != 2:
            traffic.non_2xx.append(f"{path} {reply.status_code}: {reply.text[:200]}")
            return None
        payload = reply.json()
        traffic.versions.append((time.time(), payload["model_version"]))
        return payload


def watch_alias(tracking_uri: str, stop: threading.Event, moves: list[tuple[float, str]]) -> None:
    """Record when the champion alias moves (every 0.2 s)."""
    from mlflow.tracking import MlflowClient

    client, last = MlflowClient(tracking_uri), None
    while not stop.is_set():
        try:
            version = str(client.get_model_version_by_alias("m2rec", "champion").version)
        except Exception:  # the store is busy or not created yet
            version = last
        if version != last:
            moves.append((time.time(), version))
            last = version
        time.sleep(0.2)


def prepared_dataset(workdir: Path, dataset_version: str) -> Path:
    """The prepared dataset (a kfp.local artifact) of `dataset_version`."""
    for stats in (workdir / "kfp").glob("*/prepare/dataset/stats.json"):
        if json.loads(stats.read_text())["dataset_version"] == dataset_version:
            return stats.parent
    raise FileNotFoundError(f"no prepared dataset {dataset_version} under {workdir / 'kfp'}")


def lost_and_duplicated(logged, traffic: Traffic) -> tuple[int, int]:
    """Acknowledged events missing from the log, and events logged more than once (by event_id or by user, item
    and time)."""
    lost = len(set(traffic.accepted) - set(logged["event_id"]))
    duplicated = int(logged["event_id"].duplicated().sum()) + int(
        logged.duplicated(["user_id", "item_id", "timestamp"]).sum())
    return lost, duplicated


def verify(workdir: Path, traffic: Traffic, v2: dict) -> dict:
    """Every accepted event: logged once; in its user's sequence as the service sees it and in the online store
    (Feast); in version 2's training data exactly once when v2's cutoff includes it."""
    import pandas as pd

    from m2rec.events.log import EventLog
    from m2rec.features.live import LiveSequences
    from m2rec.features.store import FeatureClient

    log = EventLog(f"sqlite:///{workdir / 'events.db'}")
    logged = log.read(log.cutoff())
    lost, duplicated = lost_and_duplicated(logged, traffic)
    data = prepared_dataset(workdir, v2["dataset_version"])
    through = json.loads((data / "stats.json").read_text())["events"]["through_seq"]
    interactions = pd.read_parquet(data / "interactions.parquet")
    training = interactions.groupby(["user_id", "item_id", "timestamp"]).size()
    in_cutoff = logged[logged["seq"] <= through]
    counts = [int(training.get((e.user_id, e.item_id, e.timestamp), 0)) for e in in_cutoff.itertuples()]
    build = FeatureClient(Path(workdir / "features") / v2["registration"]["feature_build"])
    live = LiveSequences(build, log)
    users = sorted(logged["user_id"].unique())
    served, mirrored = live.histories(users), build.current_sequences(users)
    return {"lost": lost, "duplicated": duplicated, "in_v2_training": counts.count(1),
            "in_v2_training_twice": sum(c > 1 for c in counts), "missing_from_v2_training": counts.count(0),
            "after_v2_cutoff": int((logged["seq"] > through).sum()), "v2_through_seq": int(through),
            "online_sequences_match": served == mirrored, "users": len(users)}


def service_env(v1: dict, workers: int) -> dict[str, str]:
    """The environment `bentoml serve` runs in: the pipeline's BentoML home, a 1 s registry poll, `workers`."""
    return {**os.environ, "BENTOML_HOME": v1["package"]["bentoml_home"], "BENTOML_DO_NOT_TRACK": "true",
            "M2REC_POLL_SECONDS": "1", "M2REC_RELOAD_TOKEN": RELOAD_TOKEN, "HF_HUB_OFFLINE": "1",
            "BENTOML_CONFIG_OPTIONS": f"services.m2rec_service.workers={workers}"}


def users_and_items(workdir: Path, v1: dict, n_users: int = 40) -> tuple[list[str], list[str]]:
    """`n_users` users of v1's training data (drawn with a fixed seed) and every item."""
    import pandas as pd

    interactions = pd.read_parquet(prepared_dataset(workdir, v1["dataset_version"]) / "interactions.parquet")
    users = random.Random(0).sample(sorted(interactions["user_id"].unique()), n_users)
    return users, sorted(interactions["item_id"].unique())


def run_restart_scenario(workdir: Path, clients: int = 6, events_budget: int = 150, events_per_s: float = 4.0,
                         workers: int = 2, kill_after: int = 40) -> dict:
    """A crash in the middle of traffic: `bentoml serve` (`workers` workers) and all its workers are SIGKILLed
    once `kill_after` events are acknowledged, then started again on the same port, while `clients` clients keep
    sending events and retry each unacknowledged one (same event_id) until it is. Returns what the log holds
    against what was acknowledged."""
    from m2rec.events.log import EventLog

    workdir.mkdir(parents=True, exist_ok=True)
    v1 = run_pipeline(workdir, [*TINY, "--epochs", "1"], workdir / "cycle1.log")
    env, port = service_env(v1, workers), free_port()
    users, items = users_and_items(workdir, v1)
    traffic = Traffic(events_budget, events_per_s, retry_until_acknowledged=True)
    url = f"http://127.0.0.1:{port}"
    threads = [threading.Thread(target=client, args=(url, users, items, traffic, seed)) for seed in range(clients)]
    log_path = workdir / "serve.log"
    with bentoml_server(v1["package"]["bento_tag"], env, log_path, cwd=workdir, port=port) as server:
        traffic.started = time.time()  # the pace counts from the first client
        for thread in threads:
            thread.start()
        while len(traffic.accepted) < kill_after:
            time.sleep(0.1)
        server.kill()
        killed_at = (len(traffic.accepted), traffic.sent)
    with bentoml_server(v1["package"]["bento_tag"], env, log_path, cwd=workdir, port=port):
        restarted_at = (len(traffic.accepted), traffic.sent)
        deadline = time.time() + 120
        while time.time() < deadline and (traffic.sent < events_budget or len(traffic.accepted) < traffic.sent):
            time.sleep(0.2)
        traffic.stop.set()
        for thread in threads:
            thread.join()
    log = EventLog(f"sqlite:///{workdir / 'events.db'}")
    lost, duplicated = lost_and_duplicated(log.read(log.cutoff()), traffic)
    return {"sent": traffic.sent, "accepted": len(traffic.accepted), "lost": lost, "duplicated": duplicated,
            "accepted_when_killed": killed_at[0], "sent_when_killed": killed_at[1],
            "accepted_when_restarted": restarted_at[0], "resent_after_failure": traffic.resent_after_failure,
            "retries_answered_duplicate": traffic.duplicate_replies, "workers": workers, "clients": clients}


def run_scenario(workdir: Path, tiny: bool = True, clients: int = 8, events_budget: int = 400,
                 events_per_s: float = 3.0, workers: int = 2) -> dict:
    """The scenario of the module docstring in `workdir`; returns what loop.json holds."""
    workdir.mkdir(parents=True, exist_ok=True)
    size = TINY if tiny else []
    started = time.time()
    v1 = run_pipeline(workdir, [*size, "--epochs", "1"], workdir / "cycle1.log")
    tracking_uri = v1["arguments"]["tracking_uri"]
    env = service_env(v1, workers)
    users, items = users_and_items(workdir, v1)
    traffic, moves, stop_watch = Traffic(events_budget, events_per_s), [], threading.Event()
    with bentoml_serve(v1["package"]["bento_tag"], env, workdir / "serve.log", cwd=workdir) as url:
        threads = [threading.Thread(target=client, args=(url, users, items, traffic, seed)) for seed in range(clients)]
        watcher = threading.Thread(target=watch_alias, args=(tracking_uri, stop_watch, moves))
        for thread in [*threads, watcher]:
            thread.start()
        try:
            time.sleep(3)
            failed = run_pipeline(workdir, [*size, "--epochs", "1", "--threshold", "1.0"], workdir / "cycle2a.log")
            versions_after_failed = {v for t, v in traffic.versions}
            v2 = run_pipeline(workdir, [*size, "--epochs", "8"], workdir / "cycle2b.log")
            deadline = time.time() + 60
            while time.time() < deadline and not any(v.endswith("v2") for _, v in traffic.versions):
                time.sleep(0.2)
            time.sleep(3)  # traffic on the new version
        finally:
            traffic.stop.set()
            stop_watch.set()
            for thread in [*threads, watcher]:
                thread.join()
        readiness = requests.get(f"{url}/readyz", timeout=10).json()
    moved = next((t for t, version in moves if version == v2.get("registration", {}).get("version")), None)
    first_new = next((t for t, version in sorted(traffic.versions) if version.endswith(" v2")), None)
    checks = verify(workdir, traffic, v2)
    from mlflow.tracking import MlflowClient

    failed_run = MlflowClient(tracking_uri).get_run(failed["run_id"])
    return {
        "events": {"sent": traffic.sent, "accepted": len(traffic.accepted), "lost": checks["lost"],
                   "duplicated": checks["duplicated"], "retries": traffic.retries,
                   "retries_answered_duplicate": traffic.duplicate_replies,
                   "in_v2_training_once": checks["in_v2_training"],
                   "in_v2_training_twice": checks["in_v2_training_twice"],
                   "missing_from_v2_training": checks["missing_from_v2_training"],
                   "after_v2_cutoff_served_from_log": checks["after_v2_cutoff"],
                   "online_sequences_match_feast": checks["online_sequences_match"], "users": checks["users"]},
        "swap": {"non_2xx": len(traffic.non_2xx), "non_2xx_examples": traffic.non_2xx[:5],
                 "seconds_to_new_version": None if moved is None or first_new is None else round(first_new - moved, 2),
                 "requests": traffic.requests},
        "failed_cycle": {"gate": failed["gate"], "versions_served_before_it_ended": sorted(versions_after_failed),
                         "mlflow_run_gate_passed": failed_run.data.tags.get("gate.passed"),
                         "registered": failed["registration"] is not None},
        "passed_cycle": {"gate": v2["gate"], "version": v2["registration"]["version"],
                         "events_merged": v2["events"]["merged"]},
        "readyz": readiness,
        "_meta": {"command": "python benchmarks/loop.py" + (" --tiny" if tiny else ""), "clients": clients,
                  "workers": workers, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "load_average_at_end": os.getloadavg()[0], "seconds": round(time.time() - started, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny synthetic data (as the test); default: params.yaml.")
    parser.add_argument("--workdir", type=Path, help="Working folder [default: a temporary one].")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--events", type=int, default=400, help="Distinct events the clients send at most.")
    parser.add_argument("--events-per-s", type=float, default=3.0, help="Pace of new events across the scenario.")
    parser.add_argument("--restart", action="store_true",
                        help="Instead: SIGKILL the service and its workers mid-traffic and restart it (tiny data); "
                             "writes loop_restart.json.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        workdir = args.workdir or Path(scratch)
        result = run_restart_scenario(workdir, args.clients, args.events, args.events_per_s) if args.restart \
            else run_scenario(workdir, args.tiny, args.clients, args.events, args.events_per_s)
    output = RESULTS.with_name("loop_restart.json") if args.restart else RESULTS
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
