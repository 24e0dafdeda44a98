"""Start `bentoml serve` on a loopback port for the length of a `with` block (tests, load and loop benchmarks)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    """A running `bentoml serve`: its URL and its process (BentoML's workers run in sessions of their own)."""

    url: str
    process: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL the server and every worker at once, as a crash or an OOM kill of the host would."""
        _kill_tree(self.process)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # the process ended while being read
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _kill_tree(process: subprocess.Popen) -> None:
    for pid in [process.pid, *_descendants(process.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # already gone
            pass
    process.wait()


@contextmanager
def bentoml_server(target: str, env: dict[str, str], log_path: Path, cwd: Path | None = None,
                   ready_timeout_s: float = 300, port: int | None = None) -> Iterator[Server]:
    """Serve `target` (a Bento tag or `module:Service`) on `port` (default: a free one), wait for /readyz, yield
    the Server, SIGTERM its process group at the end. Raises RuntimeError with the end of the server log if it
    exits or is not ready in time."""
    import requests

    port = port or free_port()
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "a") as log:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready in {ready_timeout_s:.0f} s:\n"
                                   f"{log_path.read_text()[-3000:]}")
            try:  # short timeouts: BentoML can hold /readyz open while the service is still starting
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        yield Server(url, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # BentoML stops its workers
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_tree(process)


@contextmanager
def bentoml_serve(target: str, env: dict[str, str], log_path: Path, cwd: Path | None = None,
                  ready_timeout_s: float = 300) -> Iterator[str]:
    """`bentoml_server`, yielding its base URL."""
    with bentoml_server(target, env, log_path, cwd, ready_timeout_s) as server:
        yield server.url
