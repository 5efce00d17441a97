"""A real MLflow tracking server on loopback (``mlflow server``, SQLite backend, proxied artifacts), for the
tracking tests.

It listens on 127.0.0.1 only, with MLflow's usage telemetry and its job runner off, so nothing leaves the
machine; it can be stopped and started again on the same port with the same data (a server that goes away
mid-run and comes back). Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from trainer.local_s3 import answers, free_port, require_loopback, stop_process

# The server's environment on top of the caller's: no usage reports (MLflow 3 sends them by default), no
# background job runner (a second process the tests do not use), and no stray MLflow settings from outside.
SERVER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
START_TIMEOUT_S = 180.0  # importing mlflow twice (the CLI, then uvicorn's worker) takes tens of seconds on a busy CI
MAX_POLLS = 2000


def server_command(host: str, port: int, root: Path) -> list[str]:
    """The exact ``mlflow server`` command line (documented in the test report and docs)."""
    return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
            "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]


class MlflowServer:
    """``with MlflowServer(tmp_dir) as server:`` then point clients at ``server.url``; ``stop()``/``start()``."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int | None = None) -> None:
        require_loopback(host)
        self.root = root
        self.host = host
        self.port = port
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def launch(self) -> MlflowServer:
        """Start the process without waiting for it (its start-up, tens of seconds, can overlap other tests)."""
        self.root.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port(self.host)
        self._log = (self.root / "server.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(SERVER_ENV)
        self._process = subprocess.Popen(
            server_command(self.host, port, self.root), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, cwd=self.root, start_new_session=True)
        self.port = port
        return self

    def start(self, timeout: float = START_TIMEOUT_S) -> MlflowServer:
        """Start (again, on the same port once one was chosen; or finish a ``launch``) and wait until ``/health``
        answers."""
        last_error = ""
        for _ in range(3):  # a port picked as free can be taken before the server binds it
            if not self.running:
                self.launch()
            if self._wait_ready(timeout):
                return self
            last_error = self.output_tail()
            self.stop()
        raise RuntimeError(f"mlflow server did not start on {self.host}:{self.port}: {last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for _ in range(MAX_POLLS):
            if time.monotonic() >= deadline or not self.running:
                return False
            if answers(self.host, self.port or 0, "/health", lambda status: status == 200):
                return True
            time.sleep(0.1)
        return False

    def output_tail(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the CLI, which forwards it to its uvicorn worker; once the worker has exited and been
        reaped, SIGKILL to the CLI: its own exit (the interpreter tearing down the whole mlflow import) takes
        seconds and does nothing the data needs. Bounded either way; no zombie is left behind."""
        if self._process is not None:
            self._process.terminate()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._process.poll() is None and self._has_children():
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
            stop_process(self._process)  # reaps it (bounded); a no-op once it has exited
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _has_children(self) -> bool:
        """Whether the CLI still has its worker (Linux's /proc; elsewhere: while the port still answers)."""
        assert self._process is not None
        path = Path(f"/proc/{self._process.pid}/task/{self._process.pid}/children")
        with contextlib.suppress(OSError):
            return bool(path.read_text().split())
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port or 0), timeout=1):
            return True
        return False

    def ensure_running(self) -> MlflowServer:
        return self if self.running else self.start()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
