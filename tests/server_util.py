"""Start a real `rattn serve` process on a free 127.0.0.1 port and wait until it is healthy."""
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_log(proc: subprocess.Popen) -> str:
    with open(proc.log_path) as f:
        return f.read()


def start_server(*args: str, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """A `rattn serve` process on a free port, healthy; the caller stops it."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--device", "cpu", *args]
    # the log goes to a file, never a pipe that nobody drains (a full pipe would block the server)
    log = tempfile.NamedTemporaryFile("w+", prefix="rattn-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.log_path = log.name
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + server_log(proc))
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise TimeoutError("server did not become healthy")
        time.sleep(0.5)


@contextmanager
def live_server(*args: str, timeout: float = 180):
    proc, base = start_server(*args, timeout=timeout)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)
