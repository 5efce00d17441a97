"""An embedded S3-compatible server on loopback (moto), for the demo, the tests and the benchmarks.

It runs in its own process, so it does not share the client's interpreter lock, and it only ever listens on a
127.x.y.z address: nothing it does leaves the machine. Install it with ``pip install detection-trainer[local-s3]``.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO

# Variables that could point a client at another endpoint or identity; the local server's env removes them.
_FOREIGN_AWS_ENV = ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def require_loopback(host: str) -> None:
    """Refuse anything but 127.0.0.0/8: tests and demos must never send traffic off this machine."""
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address; local servers listen on 127.0.0.0/8 only")


def answers(host: str, port: int, path: str, ready: Callable[[int], bool]) -> bool:
    """One GET of ``path`` (2 s at most): whether a server started here answers it with a status ``ready`` takes."""
    with contextlib.suppress(OSError, http.client.HTTPException):
        conn = http.client.HTTPConnection(host, port, timeout=2)
        try:
            conn.request("GET", path)
            return ready(conn.getresponse().status)
        finally:
            conn.close()
    return False


class LocalS3Server:
    """A moto S3 server subprocess; use as a context manager, or call start()/stop()."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = None,
                 server_env: Mapping[str, str] | None = None) -> None:
        require_loopback(host)
        self.host = host
        self.port = port
        self._server_env = dict(server_env or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """AWS variables that point a client (boto3, the trainer, the aws CLI) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "local-access-key",
            "AWS_SECRET_ACCESS_KEY": "local-secret-key",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never ask 169.254.169.254 for credentials
        }

    def apply_env(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
        for name in _FOREIGN_AWS_ENV:
            environ.pop(name, None)
        environ.update(self.client_env())

    def start(self, timeout: float = 30.0) -> LocalS3Server:
        last_error = ""
        for _ in range(3):  # a port picked as free can be taken before the server binds it
            port = self.port or free_port(self.host)
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's log, closed by stop()
            env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
            env.update(self._server_env)
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(port)],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            )
            self.port = port
            if self._wait_ready(timeout):
                return self
            last_error = self._output_tail()
            self.stop()
            self.port = None if self.port == port else self.port
        raise RuntimeError(f"the local S3 server did not start on {self.host}: {last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._process and self._process.poll() is None:
            if answers(self.host, self.port or 0, "/moto-api/", lambda status: status < 500):
                return True
            time.sleep(0.1)
        return False

    def _output_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running(host: str = "127.0.0.1") -> Iterator[LocalS3Server]:
    with LocalS3Server(host) as server:
        yield server


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate a server process, and kill it if it has not exited 10 s later (bounded either way)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
