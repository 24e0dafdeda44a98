"""Shared fixtures: paths to the real datasets and small prepared datasets built once per session."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("M2REC_DATASETS", REPO.parent / "shared" / "datasets"))
BENCHMARKS = REPO / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script benchmarks/NAME.py as the module NAME, registered in sys.modules (pickling for worker processes
    and dataclasses look it up there); the scripts import one another, so their folder goes on sys.path."""
    if name not in sys.modules:
        if str(BENCHMARKS) not in sys.path:
            sys.path.insert(0, str(BENCHMARKS))
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def kill_after_acks(writer: subprocess.Popen, acks: Path, count: int = 50) -> tuple[list[str], int]:
    """SIGKILL a writer process once its acknowledgement file (one `name-index` line per write that returned) holds
    `count` lines: mid-stream, possibly inside a transaction. Returns the acknowledged lines and the index a
    restarted writer resumes from (one past the last acknowledged)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not acks.exists() or len(acks.read_text().split()) < count):
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    acked = acks.read_text().split()
    assert len(acked) >= count
    return acked, max(int(line.split("-")[1]) for line in acked) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with end-to-end (`slow`) tests first: `make test` hands whole files to two workers in this order
    (`--dist loadfile --no-loadscope-reorder`), so the minutes-long scenarios start at once, not last."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order otherwise


def dataset_path(name: str) -> Path:
    """Path of a shared real dataset; the test fails (not skips) when it is missing, since CI has it."""
    path = DATASETS / name
    assert path.exists(), f"real dataset {path} is missing (set M2REC_DATASETS to the folder holding it)"
    return path


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return dataset_path("ml-100k")


@pytest.fixture(scope="session")
def amazon_games_dir() -> Path:
    return dataset_path("amazon-games")


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small prepared synthetic dataset (about 120 users) shared by model, training and stage tests."""
    from m2rec.data.sources import SourceSpec
    from m2rec.data.synthetic import SyntheticParams
    from m2rec.stages.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(SourceSpec("synthetic"), out, synthetic=SyntheticParams(n_users=120, n_items=80, max_length=30))
    return out


PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def redis_reachable() -> bool:
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def postgres_url():
    """A fresh database on the local PostgreSQL server as postgresql://USER@HOST:PORT/DB, dropped afterwards;
    skips, saying why, when there is no server."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (dependency psycopg2-binary)")
    admin, reason = None, ""
    for user in ("postgres", "root"):
        try:
            admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, connect_timeout=3)
            break
        except psycopg2.OperationalError as err:
            reason = str(err).strip()
    if admin is None:
        pytest.skip(f"PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_DATABASE} is unreachable: {reason}")
    admin.autocommit = True
    database = f"m2rec_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    yield f"postgresql://{admin.info.user}@{PG_HOST}:{PG_PORT}/{database}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    admin.close()
