"""A TCP proxy that adds latency, put between workers and the S3 server (``bench.s3latency``).

Loopback SeaweedFS answers a small PUT in about 1 ms; S3 from a cloud GPU host takes 10-50 ms. Every
byte a client sends is held ``delay_s`` from when it arrived, in order, before it goes upstream:
each request, on a new or a kept-alive connection, reaches the server ``delay_s`` later, as over a
slow link. Replies come back at once, so a request costs ``delay_s`` more, not twice that. Pattern of
the fault suite's proxy (tests/faults/servers.py), with a timed queue in place of the cut and hold.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time

from tests.support.s3server import free_port


class LatencyProxy:
    """Forwards a loopback port to ``upstream`` (host, port), each request ``delay_s`` late."""

    def __init__(self, upstream: tuple[str, int], delay_s: float):
        self.upstream, self.delay_s = upstream, delay_s
        self.port = free_port()
        self.requests = 0  # client sends that went upstream: about one per request
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        _close(self._listener)
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns |= {client, server}
            held: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()
            for target, args in ((self._read_up, (client, held)), (self._send_up, (held, server, client)),
                                 (self._pump_down, (server, client))):
                threading.Thread(target=target, args=args, daemon=True).start()

    def _read_up(self, src: socket.socket, held: queue.SimpleQueue) -> None:
        """What the client sends, stamped with its arrival time."""
        try:
            while data := src.recv(65536):
                held.put((time.monotonic(), data))
        except OSError:
            pass
        held.put(None)

    def _send_up(self, held: queue.SimpleQueue, dst: socket.socket, src: socket.socket) -> None:
        """Each piece goes upstream ``delay_s`` after it arrived (pieces of one request overlap their wait)."""
        last = 0.0
        try:
            while (item := held.get()) is not None:
                arrived, data = item
                if arrived - last > 0.001:  # a new send after a pause: count it as a request
                    self.requests += 1
                last = arrived
                wait = arrived + self.delay_s - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _pump_down(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            _close(s)
        with self._lock:
            self._conns -= set(socks)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
