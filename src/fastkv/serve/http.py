"""The HTTP server around the app: uvicorn, with bounds on what a slow or greedy client can hold.

- A connection must send a whole request head within `header_timeout` seconds of connecting (or of its
  previous response): uvicorn has no such bound, so a client sending a byte at a time held a connection
  forever. Idle keep-alive connections close after `keep_alive` seconds.
- At most `max_connections` connections at once: beyond them uvicorn answers 503.
- Shutdown (SIGTERM, SIGINT) is bounded: admission stops and waiting requests fail at once, running ones
  get `shutdown_timeout` seconds to finish, then the rest end with an error and the process exits 0.
- `logging_config`: uvicorn's logging with the server's own logger ("fastkv.serve": its startup line, a
  line per request, errors) printed as uvicorn prints its lines; `fastkv serve` runs with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
from dataclasses import dataclass

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

LOGGER = "fastkv.serve"  # the logger of the app and its scheduler (`api.log`)


GRACE_AFTER_STOP = 5  # seconds uvicorn waits for responses beyond the scheduler's shutdown bound


@dataclass(frozen=True)
class Connections:
    header_timeout: float = 10.0
    keep_alive: float = 5.0
    max_connections: int = 256
    shutdown_timeout: float = 30.0


class HeadTimeout(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive in time."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request head arrived: it is the app's now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request's head must arrive in time too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            with contextlib.suppress(h11.LocalProtocolError):
                self.conn.send(h11.ConnectionClosed())
            self.transport.close()


class Server(uvicorn.Server):
    """uvicorn's server, telling the app's scheduler to stop admitting as soon as a shutdown signal comes."""

    def __init__(self, config: uvicorn.Config, scheduler, shutdown_timeout: float = 30.0) -> None:
        super().__init__(config)
        self.scheduler, self.shutdown_timeout = scheduler, shutdown_timeout
        self.stopping: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        """Stop admitting now, and end the running requests ourselves after `shutdown_timeout` (each stream
        gets an error event and its `[DONE]`): uvicorn's own bound comes later (`server`), so it never has to
        cancel a response half-written, which it logs with a traceback."""
        self.scheduler.close_admission()
        if self.stopping is None:
            self.stopping = threading.Thread(target=self.scheduler.stop, args=(self.shutdown_timeout,), daemon=True)
            self.stopping.start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn's, except that a shutdown a signal asked for, once done, exits 0: uvicorn re-raises the
        signal after its graceful shutdown, so the process would end killed by it (status -15 / 143) and a
        supervisor would count a clean stop as a failure. A forced exit (a second Ctrl-C) still re-raises."""
        with super().capture_signals():
            yield
            if not self.force_exit and hasattr(self, "_captured_signals"):
                self._captured_signals.clear()


def logging_config(level: str = "info", with_uvicorn: bool = True) -> dict:
    """A `logging.config.dictConfig` configuration: uvicorn's own (`uvicorn.config.LOGGING_CONFIG`) with the
    "fastkv.serve" logger added at `level`, through uvicorn's handler and formatter (`DefaultFormatter`), so
    that the server's lines read like uvicorn's ("INFO:     ..."). Without a handler of its own that logger
    would print nothing below WARNING (Python's last-resort handler). It does not propagate, as uvicorn's
    loggers do not, so that a root handler does not print its lines twice. with_uvicorn False: that logger
    alone (a Ray replica, where no uvicorn server of ours runs)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    if not with_uvicorn:
        config["loggers"] = {}
    config["loggers"][LOGGER] = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return config


def server(app, host: str, port: int, limits: Connections = Connections(), log_level: str = "info",
           log_config: dict | None = None) -> Server:  # fmt: skip
    """A uvicorn server for a fastkv app (`create_app`), with `limits`. log_config: the logging configuration
    it applies (`logging_config`; None: uvicorn's own, which leaves "fastkv.serve" to the caller's logging)."""
    protocol = type("Bounded", (HeadTimeout,), {"header_timeout": limits.header_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        log_config=LOGGING_CONFIG if log_config is None else log_config,
        http=protocol,
        timeout_keep_alive=int(max(1, limits.keep_alive)),
        limit_concurrency=limits.max_connections,
        # After the scheduler's own bound (`Server.handle_exit`), with time for the ended streams to close.
        timeout_graceful_shutdown=int(max(1, limits.shutdown_timeout)) + GRACE_AFTER_STOP,
    )
    return Server(config, app.state.scheduler, limits.shutdown_timeout)
