"""A cheap S3-compatible GET endpoint for benchmarks: nginx serving a folder at path-style URLs
(``http://<host>:<port>/<bucket>/<key>``), with an optional fixed delay per request done inside nginx (the echo
module's ``echo_sleep``).

Why not the moto server and the Python fault proxy the tests use: on a 2-core machine those Python processes
spend as much CPU per request as the client under test, so a loader bench against them measures the server.
nginx answers a GET for a few microseconds of CPU, so the S3 rows measure the client. It serves GET and HEAD
with ETag, Last-Modified, Range and If-Match, which is all the read path uses; signatures are ignored. Moto stays
the endpoint of the correctness tests.

Needs ``nginx`` and its echo module: ``scripts/bench-tools.sh`` installs them (Debian: nginx-light,
libnginx-mod-http-echo). Where they cannot be installed system-wide (a GPU box without a package registry), point
``BENCH_NGINX`` at an nginx binary and ``BENCH_NGINX_ECHO_MODULE`` at the module copied from a machine that has them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from trainer.local_s3 import stop_process

ECHO_MODULE = Path(os.environ.get("BENCH_NGINX_ECHO_MODULE", "/usr/lib/nginx/modules/ngx_http_echo_module.so"))
BENCH_HOST = "127.0.0.61"  # its own loopback address: nothing here leaves the machine

_CONFIG = """
load_module {module};
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
    server {{
        listen {host}:{port} backlog=1024;
        root {root};
        location / {{
            limit_except GET {{ deny all; }}
            {delay}
        }}
        location @object {{
        }}
    }}
}}
"""


def missing_tools() -> str | None:
    """Why the endpoint cannot start here, or None."""
    if not Path(_nginx()).exists():
        return "nginx is not installed (run scripts/bench-tools.sh, or set BENCH_NGINX)"
    if not ECHO_MODULE.exists():
        return f"the nginx echo module is missing ({ECHO_MODULE}; run scripts/bench-tools.sh)"
    return None


def _nginx() -> str:
    return os.environ.get("BENCH_NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class StaticS3:
    """nginx serving ``root`` (its first-level folders are the buckets) on ``BENCH_HOST``; a context manager."""

    def __init__(self, root: Path, latency_ms: float = 0.0, host: str = BENCH_HOST) -> None:
        self.root, self.latency_ms, self.host = root, latency_ms, host
        self.port = 0
        self._work = tempfile.TemporaryDirectory(prefix="static-s3-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """``environ`` (default: this process's) with every AWS variable replaced by ones that point a client here
        and nowhere else: no profile, config file, service-specific endpoint or instance metadata of the user's."""
        base = dict(os.environ if environ is None else environ)
        return {**{name: value for name, value in base.items() if not name.startswith("AWS_")},
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    @property
    def pid(self) -> int:
        """The nginx process (one: no master, one worker), whose CPU the loader bench reports."""
        assert self._process is not None, "not started"
        return self._process.pid

    def __enter__(self) -> StaticS3:
        problem = missing_tools()
        if problem:
            raise RuntimeError(problem)
        work = Path(self._work.name)
        self.port = _free_port(self.host)
        delay = (f"echo_sleep {self.latency_ms / 1000:.3f}; echo_exec @object;" if self.latency_ms > 0 else "")
        config = work / "nginx.conf"
        config.write_text(_CONFIG.format(module=ECHO_MODULE, work=work, host=self.host, port=self.port,
                                         root=self.root.resolve(), delay=delay))
        self._process = subprocess.Popen([_nginx(), "-p", str(work), "-c", str(config)], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded: 10 s for nginx to listen
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
                return self
            except OSError:
                if self._process.poll() is not None:
                    break
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"nginx did not start on {self.endpoint_url}")

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            stop_process(self._process)
        self._work.cleanup()
