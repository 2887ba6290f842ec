"""An HTTP/1.1 server whose threads serve requests, not connections.

Why: `http.server`'s threading server gives every connection a thread for its whole life, so
keep-alive clients (every HTTP library's default) hold a thread while they think, and a client
that connects and sends nothing holds one until it times out. TF Serving's REST front end
(libevent's evhttp under `net_http`) instead waits for all its connections at once and hands
one that has a request to a fixed pool of threads. This module does the same with the
standard library:

    accept loop ──► waiting set (one selector thread) ──readable──► worker pool (N threads)
                          ▲                                              │
                          └──────── keep-alive: the connection goes back ┘

- listen backlog 1024 (socketserver's 5 reset bursts of 64 connections);
- a connection waits in the selector, without a thread, until it has bytes to read, for at
  most `timeout_s` (idle keep-alive connections and silent clients are closed after it); at
  most `MAX_WAITING` wait, past that the accept loop pauses and the backlog holds the rest;
- with TLS the handshake runs on a worker, once the client's hello has arrived, under the
  same timeout: one idle TCP connection cannot hold up other HTTPS clients;
- a request is read and answered on a worker under `timeout_s`; requests a client pipelines
  are answered in order on the same worker;
- `stop()` closes the listening socket and the waiting connections, and lets requests already
  on a worker finish.
"""

from __future__ import annotations

import dataclasses
import queue
import selectors
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

MAX_WAITING = 4096  # connections waiting for a request; each costs a file descriptor


@dataclasses.dataclass(frozen=True)
class _Waiting:
    address: tuple
    deadline: float
    handshake: bool  # a new TLS connection: the handshake comes first


class KeepAliveHandler(BaseHTTPRequestHandler):
    """A request handler for `PooledHTTPServer`: HTTP/1.1, one request per visit to a worker
    (more only when the client has already sent them), then back to the waiting set."""

    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection and self._request_waiting():
            self.handle_one_request()

    def _request_waiting(self) -> bool:
        """Whether bytes of a next request are already read ahead (into `rfile`'s buffer or
        TLS's), where the selector cannot see them: a non-blocking peek."""
        self.connection.setblocking(False)
        try:
            return bool(self.rfile.peek(1))
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            self.close_connection = True
            return False
        finally:
            self.connection.settimeout(self.server.timeout_s)


class PooledHTTPServer(HTTPServer):
    """`HTTPServer` with a waiting set and `num_workers` threads (see the module docstring).

    Call `serve_forever()` on a thread of its own, as with any socketserver; `stop()` from
    another.
    """

    request_queue_size = 1024

    def __init__(self, address, handler: type[KeepAliveHandler],
                 ssl_context: ssl.SSLContext | None, num_workers: int, timeout_s: float):
        super().__init__(address, handler)
        self.ssl_context, self.timeout_s = ssl_context, timeout_s
        self.stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Condition()
        self._waiting = 0
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._watch, name="http-waiting", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"http-worker-{n}",
                                           daemon=True) for n in range(num_workers)]
        for thread in self._threads:
            thread.start()

    # -- the accept loop (socketserver calls this for every accepted connection) -----------

    def process_request(self, request: socket.socket, client_address) -> None:
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # headers, body: 2 sends
        with self._lock:
            while self._waiting >= MAX_WAITING and not self.stopping.is_set():
                self._lock.wait(0.2)
        self._wait_for_request(request, client_address, handshake=self.ssl_context is not None)

    def _wait_for_request(self, sock: socket.socket, address, handshake: bool) -> None:
        with self._lock:
            if self.stopping.is_set():
                self.shutdown_request(sock)
                return
            self._waiting += 1
            self._selector.register(
                sock, selectors.EVENT_READ,
                _Waiting(address, time.monotonic() + self.timeout_s, handshake))

    # -- the waiting set --------------------------------------------------------------------

    def _watch(self) -> None:
        scanned = time.monotonic()
        while not self.stopping.is_set():
            events = self._selector.select(timeout=min(1.0, self.timeout_s))
            now = time.monotonic()
            with self._lock:
                ready = [(key.fileobj, key.data) for key, _ in events if key.data is not None]
                expired = []
                if now - scanned >= min(0.25, self.timeout_s / 4):  # not on every wake-up
                    scanned, readable = now, {sock for sock, _ in ready}
                    expired = [key.fileobj for key in list(self._selector.get_map().values())
                               if key.data is not None and key.data.deadline < now
                               and key.fileobj not in readable]
                for sock in [s for s, _ in ready] + expired:
                    self._selector.unregister(sock)
                self._waiting -= len(ready) + len(expired)
                self._lock.notify_all()
            for item in ready:
                self._ready.put(item)
            for sock in expired:
                self.shutdown_request(sock)
            if any(key.data is None for key, _ in events):
                self._wake_read.recv(64)

    # -- the workers ------------------------------------------------------------------------

    def _work(self) -> None:
        while (item := self._ready.get()) is not None:
            self._serve(*item)

    def _serve(self, sock: socket.socket, waiting: _Waiting) -> None:
        keep = False
        try:
            if waiting.handshake:
                sock.settimeout(self.timeout_s)
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True)
                except (OSError, ValueError):  # handshake failed or timed out
                    self.shutdown_request(sock)
                    return
            sock.settimeout(self.timeout_s)
            handler = self.RequestHandlerClass(sock, waiting.address, self)
            keep = not handler.close_connection
        except Exception:  # noqa: BLE001  (socketserver's own policy: report, close)
            self.handle_error(sock, waiting.address)
        if keep:
            self._wait_for_request(sock, waiting.address, handshake=False)
        else:
            self.shutdown_request(sock)

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stops accepting, closes waiting connections, and waits for requests on workers."""
        self.stopping.set()
        self.shutdown()  # the accept loop returns
        self.server_close()
        self._wake_write.send(b"x")
        workers = self._threads[1:]
        for _ in workers:
            self._ready.put(None)
        for thread in self._threads:
            thread.join()
        with self._lock:
            for key in list(self._selector.get_map().values()):
                if key.data is not None:
                    self.shutdown_request(key.fileobj)
            self._selector.close()
        while True:  # readable just before the watcher stopped: never reached a worker
            try:
                item = self._ready.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self.shutdown_request(item[0])
        self._wake_read.close()
        self._wake_write.close()
