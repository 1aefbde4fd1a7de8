"""A server running in a thread of this process (tests, benchmarks, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

from .api import create_app
from .http import Connections, server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_total(url: str, name: str) -> float:
    """A metric from a server's /metrics: its value, or the sum of its labelled series (replicas, statuses).
    KeyError if the server does not export it."""
    import httpx

    lines = [x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith((name + " ", name + "{"))]
    if not lines:
        raise KeyError(name)
    return sum(float(x.split()[-1]) for x in lines)


class ServerThread:
    """`create_app(llm, name, method, **options)` served on 127.0.0.1 at a free port until `close()`, by the
    same server as `fastkv serve` (`http.server`, with its connection bounds)."""

    def __init__(self, llm, name: str, method: str = "fastkv", connections: Connections = Connections(),
                 **options) -> None:  # fmt: skip
        self.app = create_app(llm, name, method, **options)
        self.port = free_port()
        self.server = server(self.app, "127.0.0.1", self.port, connections, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def metric(self, name: str) -> float:
        """A metric's value from /metrics (`metric_total`)."""
        return metric_total(self.url, name)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
