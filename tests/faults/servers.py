"""Servers a fault can be done to: a redis-server of our own (restartable, AOF) and a TCP proxy that cuts."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.support.s3server import free_port


class TcpProxy:
    """Forwards a loopback port to ``upstream``; ``cut()`` refuses new connections and drops live ones."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()  # cleared by hold(): requests wait, as in a stalled network
        self._flowing.set()
        self.late_bytes = 0  # what a held request sent, counted as it went through after release()
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind(("127.0.0.1", self.port))
        lst.listen(128)
        self._listener = lst
        threading.Thread(target=self._accept, args=(lst,), daemon=True).start()

    def cut(self) -> None:
        lst, self._listener = self._listener, None
        if lst is not None:
            _close(lst)  # shutdown() wakes the thread blocked in accept(); close() alone would not
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            _close(c)

    def hold(self) -> None:
        """Connections stay open but what clients send is held back (a PUT hangs mid-request)."""
        self._flowing.clear()

    def release(self) -> None:
        """What was held goes through now, late."""
        self._flowing.set()

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                client, _ = lst.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                self._conns |= {client, server}
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, upstream), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool = False) -> None:
        try:
            while data := src.recv(65536):
                if upstream and not self._flowing.is_set():
                    self._flowing.wait()
                    self.late_bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                _close(s)
            with self._lock:
                self._conns -= {src, dst}


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
