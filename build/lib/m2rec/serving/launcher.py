"""Start `bentoml serve` on a free loopback port for the length of a `with` block (tests, load benchmark)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def bentoml_serve(target: str, env: dict[str, str], log_path: Path, cwd: Path | None = None,
                  ready_timeout_s: float = 300) -> Iterator[str]:
    """Serve `target` (a Bento tag or `module:Service`), wait for /readyz, yield the base URL, SIGTERM at the end.
    Raises RuntimeError with the end of the server log if it exits or is not ready in time."""
    import requests

    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
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
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
