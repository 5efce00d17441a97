"""A fault-injecting HTTP proxy on loopback, placed between a client and the local S3 server.

It forwards every request to the upstream server and, by a seeded plan, adds latency, answers a fraction of
requests with S3's ``503 SlowDown`` or ``500 InternalError``, or cuts a response body after N bytes with a TCP
reset. Used by storage fault tests, loader benchmarks and checkpoint fault tests. Bounded: it serves at most
``max_requests`` requests and upstream calls time out.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trainer.local_s3 import require_loopback

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
               "proxy-connection", "expect"}

_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many parallel clients connect at once


@dataclass
class FaultPlan:
    """What to do to the traffic; change it between phases of a test with ``FaultProxy.plan = ...``."""

    latency_s: float = 0.0  # added before forwarding each request
    error_rate: float = 0.0  # fraction of requests answered with an error instead of being forwarded
    error_statuses: tuple[int, ...] = (503, 500)
    cut_rate: float = 0.0  # fraction of response bodies (larger than cut_after_bytes) cut mid-stream
    cut_after_bytes: int = 4096
    methods: tuple[str, ...] = ("GET", "PUT", "POST", "HEAD", "DELETE")  # which requests faults may hit
    seed: int = 0


@dataclass
class FaultStats:
    requests: int = 0
    errors: int = 0
    cuts: int = 0
    by_method: dict[str, int] = field(default_factory=dict)


class FaultProxy:
    """``with FaultProxy(upstream_host, upstream_port) as proxy:`` then point clients at ``proxy.url``."""

    def __init__(self, upstream_host: str, upstream_port: int, plan: FaultPlan | None = None,
                 host: str = "127.0.0.1", max_requests: int = 200_000, upstream_timeout: float = 60.0) -> None:
        require_loopback(upstream_host)
        require_loopback(host)
        self.upstream = (upstream_host, upstream_port)
        self.max_requests = max_requests
        self.upstream_timeout = upstream_timeout
        self.stats = FaultStats()
        self._lock = threading.Lock()
        self._rng = random.Random(0)
        self.plan = plan or FaultPlan()
        self._server = _Server((host, 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def plan(self) -> FaultPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._rng = random.Random(plan.seed)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def _decide(self, method: str) -> tuple[FaultPlan, int | None, bool]:
        """Under the lock: (plan, error status or None, whether to cut the body)."""
        with self._lock:
            self.stats.requests += 1
            self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
            if self.stats.requests > self.max_requests:
                return self._plan, 503, False
            plan = self._plan
            if method not in plan.methods:
                return plan, None, False
            if plan.error_rate and self._rng.random() < plan.error_rate:
                self.stats.errors += 1
                return plan, self._rng.choice(plan.error_statuses), False
            cut = bool(plan.cut_rate) and self._rng.random() < plan.cut_rate
            return plan, None, cut

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 60

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _read_body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _send_error_reply(self, status: int) -> None:
                code, message = _ERRORS.get(status, ("InternalError", "Injected failure."))
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _reset(self) -> None:
                """Abort the connection with a TCP RST, as a dropped load balancer connection looks."""
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _proxy(self) -> None:
                body = self._read_body()
                plan, error, cut = proxy._decide(self.command)
                if plan.latency_s:
                    time.sleep(plan.latency_s)
                if error is not None:
                    self._send_error_reply(error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    self.send_response_only(response.status, response.reason)
                    for name, value in response.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    declared = response.getheader("Content-Length")
                    self.send_header("Content-Length", declared if self.command == "HEAD" and declared
                                     else str(len(payload)))
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if cut and len(payload) > plan.cut_after_bytes:
                        with proxy._lock:
                            proxy.stats.cuts += 1
                        self.wfile.write(payload[: plan.cut_after_bytes])
                        self._reset()
                        return
                    self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _proxy

        return Handler


def main() -> None:
    """Run the proxy in its own process (benchmarks do, so it does not share their interpreter lock).

    Prints its URL on the first line of stdout, then serves until terminated or ``--max-seconds`` pass.
    """
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the S3 server (loopback only)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--cut-rate", type=float, default=0.0)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    plan = FaultPlan(latency_s=args.latency_ms / 1000, error_rate=args.error_rate, cut_rate=args.cut_rate)
    with FaultProxy(host, int(port), plan) as proxy:
        print(proxy.url, flush=True)
        time.sleep(args.max_seconds)


if __name__ == "__main__":
    main()
