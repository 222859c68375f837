"""A local MLflow tracking server (SQLite backend + artifact directory), for the quickstart and tests.

    server = start_mlflow_server(Path("work/mlflow"))   # http://127.0.0.1:<port>
    ...
    stop_mlflow_server(server.pid_file)

The server runs as its own process group, so it outlives the command that started it (the
quickstart leaves it running for the user to browse) and can be stopped from its pid file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MlflowServer:
    uri: str
    pid: int
    root: Path

    @property
    def pid_file(self) -> Path:
        return self.root / "server.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_up(uri: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def running_server(root: Path) -> MlflowServer | None:
    """The server a previous call started for `root`, if it still answers."""
    record = root / "server.json"
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    server = MlflowServer(data["uri"], data["pid"], root)
    return server if is_up(server.uri) else None


def start_mlflow_server(root: Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 120.0) -> MlflowServer:
    """Start (or reuse) a tracking server storing runs in `root/mlflow.db` and artifacts in `root/artifacts`."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    existing = running_server(root)
    if existing:
        return existing
    port = port or free_port(host)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    log = open(root / "server.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while not is_up(uri):
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}; see {root / 'server.log'}")
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"mlflow server did not answer within {timeout:.0f} s; see {root / 'server.log'}")
        time.sleep(0.5)
    server = MlflowServer(uri, process.pid, root)
    server.pid_file.write_text(json.dumps({"uri": uri, "pid": process.pid}))
    return server


def stop_mlflow_server(root: Path) -> bool:
    """Stop the server started for `root`; False if none was running."""
    record = Path(root) / "server.json"
    if not record.is_file():
        return False
    pid = json.loads(record.read_text())["pid"]
    record.unlink()
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    return True
